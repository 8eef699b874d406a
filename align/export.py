"""``align export``: a run's adapter as a GGUF file for llama.cpp, Ollama and LM Studio.

``gguf``: the adapter merged into its base model (as ``align merge`` does) and written with the
``gguf`` package in llama.cpp's layout for the llama architecture (``token_embd``,
``blk.N.attn_q`` ..., ``output_norm``; the query and key rows in llama.cpp's rotary order), with
the tokenizer (``tokenizer.ggml.*``: the byte-level BPE vocabulary, merges, special tokens) and
the chat template in its metadata, plus an Ollama ``Modelfile`` and a model card beside it.

``gguf-lora``: the adapter alone, in llama.cpp's LoRA adapter layout (``general.type: adapter``,
``adapter.type: lora``, ``adapter.lora.alpha``; ``blk.N.attn_v.weight.lora_a`` / ``.lora_b``),
for users who keep the base model's GGUF and load the adapter with ``--lora``.

Everything is written into a staging directory beside ``output`` and renamed into place, so
``output`` is absent or complete. The weights are quantized by the ``gguf`` package's own
(numpy) quantizers, so no llama.cpp build is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.errors import AlignError, ModelError, closest

FORMATS = ("gguf", "gguf-lora")
#: ``--quantize`` values → the GGML type of the 2-D weights (1-D tensors, the norms, stay f32).
QUANTIZE = ("f16", "q8_0", "bf16", "f32", "q5_1", "q5_0", "q4_1", "q4_0")
#: The quantizations of ``gguf-lora`` (llama.cpp reads its adapters' tensors as f32 or f16).
LORA_QUANTIZE = ("f16", "f32")
MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
#: ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer, which splits text before BPE) of the bases
#: align knows, by hub id prefix; any other base gets ``gpt2``'s (llama.cpp's converter tells them
#: apart by hashing a tokenization, which needs llama.cpp's table of hashes).
PRE_TOKENIZERS = {
    "HuggingFaceTB/SmolLM2-": "smollm",
    "HuggingFaceTB/SmolLM-": "smollm",
    "meta-llama/Llama-3": "llama-bpe",
    "meta-llama/Meta-Llama-3": "llama-bpe",
}


def pre_tokenizer(base: str | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the base with hub id ``base``."""
    for prefix, name in PRE_TOKENIZERS.items():
        if base and base.startswith(prefix):
            return name
    return "gpt2"


_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def check_options(fmt: str, quantize: str | None) -> str:
    """The quantization to write (``f16`` when not given); one-line errors for unknown values."""
    if fmt not in FORMATS:
        raise AlignError(
            f"--format: unknown format '{fmt}'{closest(fmt, FORMATS)} (formats: {', '.join(FORMATS)})"
        )
    valid = QUANTIZE if fmt == "gguf" else LORA_QUANTIZE
    quantize = quantize or "f16"
    if fmt == "gguf" and "_k" in quantize.lower():
        raise AlignError(
            f"--quantize: '{quantize}' is a k-quant, which the gguf package cannot compute; export with "
            "--quantize f16 and run llama.cpp's llama-quantize on model.gguf"
        )
    if quantize not in valid:
        raise AlignError(
            f"--quantize: '{quantize}' is not a quantization of --format {fmt}{closest(quantize, valid)} "
            f"(it writes: {', '.join(valid)})"
        )
    return quantize


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of a Hugging Face llama weight (``model.layers.3.mlp.up_proj.weight``
    → ``blk.3.ffn_up.weight``); a :class:`ModelError` for a tensor llama.cpp's llama has not."""
    stem, _, kind = hf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module = ".".join(parts[3:])
        if module in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[module]}.{kind}"
    raise ModelError(
        f"{hf_name}: a weight llama.cpp's llama architecture has no place for; export the merged model "
        "with `align merge` and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def permute_rows(weights: Any, heads: int) -> Any:
    """The rows of a query or key projection in llama.cpp's rotary order (each head's halves
    interleaved), as llama.cpp's converter writes them and its readers undo."""
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _heads(config: Any, gguf_tensor: str) -> int | None:
    if ".attn_q." in gguf_tensor:
        return int(config.num_attention_heads)
    if ".attn_k." in gguf_tensor:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def check_llama(config: Any, where: str) -> None:
    """Refuse what this writer does not handle rather than write a file llama.cpp misreads."""
    if getattr(config, "model_type", None) != "llama":
        raise ModelError(
            f"{where}: a {getattr(config, 'model_type', 'unknown')} model; align export writes the llama "
            "architecture (SmolLM2, Llama) only: export with `align merge` and convert the merged model "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(
            f"{where}: rope scaling '{rope.get('rope_type')}' is not written by align export; convert the "
            "`align merge` model with llama.cpp's convert_hf_to_gguf.py"
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hparams(writer: Any, config: Any, name: str) -> None:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))


def _write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, base: str | None) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) model, with the chat template."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(
            f"the tokenizer is {model.get('type')}, not byte-level BPE; align export writes BPE tokenizers "
            "(SmolLM2, Llama 3) only: convert the `align merge` model with llama.cpp's convert_hf_to_gguf.py"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {int(i) for i in tokenizer.added_tokens_decoder}
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:  # rows of the embedding past the tokenizer's vocabulary
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in special:
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_add_space_prefix(False)  # byte-level BPE marks spaces in its tokens (Ġ), adds none
    writer.add_tokenizer_pre(pre_tokenizer(base))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # (none for a vocabulary of bytes alone: gguf writes no empty array)
    for token, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        index = getattr(tokenizer, f"{token}_token_id", None)
        if index is not None:
            add(int(index))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _encode(array: Any, quantize: str) -> tuple[Any, Any]:
    """``(data, raw GGML type)`` of a float32 array at ``quantize``; 1-D tensors stay f32, and a
    matrix whose rows do not fill whole quantization blocks falls back to f16 (as llama.cpp does)."""
    import gguf
    import numpy as np
    from gguf import quants

    kind = gguf.GGMLQuantizationType
    if array.ndim < 2 or quantize == "f32":
        return array.astype(np.float32), kind.F32
    if quantize == "f16":
        return array.astype(np.float16), kind.F16
    target = kind[quantize.upper()]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), kind.F16
    return quants.quantize(array, target), target


def _file_type(quantize: str) -> int:
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(quantize, f"MOSTLY_{quantize.upper()}")])


def write_model_gguf(
    model: Any, tokenizer: Any, path: Path, *, quantize: str, name: str, base: str | None
) -> None:
    """Write a (merged) llama model and its tokenizer as one GGUF file."""
    import gguf

    config = model.config
    check_llama(config, name)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_hparams(writer, config, name)
    writer.add_file_type(_file_type(quantize))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer, int(config.vocab_size), base)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, array in _float_tensors(model):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output projection from token_embd when output is absent
        target = gguf_name(hf_name)
        heads = _heads(config, target)
        if heads is not None:
            array = permute_rows(array, heads)
        data, raw = _encode(array, quantize)
        writer.add_tensor(target, data, raw_dtype=raw)
    _finish(writer)


def _float_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    for hf_name, tensor in model.state_dict().items():
        yield hf_name, tensor.detach().to("cpu").float().numpy()


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_tensors(peft_model: Any) -> Iterator[tuple[str, Any, Any, float]]:
    """``(hf weight name, A, B, scaling)`` of every LoRA layer of the active adapter."""
    from align.compat import lora_layers

    name = peft_model.active_adapter
    for layer in lora_layers(peft_model, name):
        if layer.dora:
            raise ModelError(f"{layer.peft_name}: a DoRA adapter; llama.cpp's LoRA adapters cannot hold it")
        a = layer.a.detach().to("cpu").float().numpy()
        b = layer.b.detach().to("cpu").float().numpy()
        yield layer.base_name + ".weight", a, b, layer.scaling


def write_lora_gguf(peft_model: Any, path: Path, *, quantize: str, name: str) -> None:
    """Write the active PEFT adapter in llama.cpp's LoRA adapter GGUF layout.

    llama.cpp adds ``scale * alpha / rank * B @ A`` to each weight (``rank``: A's rows), so the
    alpha written is PEFT's scaling times the rank: the same change PEFT makes (also for rsLoRA)."""
    import gguf

    config = peft_model.get_base_model().config
    check_llama(config, name)
    layers = list(lora_tensors(peft_model))
    if not layers:
        raise ModelError(f"{name}: the adapter has no LoRA layers to export")
    alphas = {round(scaling * a.shape[0], 6) for _, a, _, scaling in layers}
    if len(alphas) > 1:
        raise ModelError(
            f"{name}: the adapter's layers scale differently; llama.cpp's adapters have one alpha"
        )
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alphas.pop()))
    for hf_name, a, b, _ in layers:
        target = gguf_name(hf_name)
        heads = _heads(config, target)
        if heads is not None:
            b = permute_rows(b, heads)  # the rows of B are the output rows of the projection
        for suffix, array in (("lora_a", a), ("lora_b", b)):
            data, raw = _encode(array, quantize)
            writer.add_tensor(f"{target}.{suffix}", data, raw_dtype=raw)
    _finish(writer)


def chatml_modelfile(tokenizer: Any) -> str:
    """An Ollama ``Modelfile`` for ``model.gguf``: ChatML templates (SmolLM2's, Qwen's) are written
    as Ollama's Go template, with the system message the Jinja template adds by default; another
    template is left to Ollama, which reads ``tokenizer.chat_template`` from the GGUF."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{MODEL_FILE}", ""]
    template = tokenizer.chat_template or ""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if "<|im_start|>" in template:
        system = _default_system(tokenizer)
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            '{{ end }}<|im_start|>assistant\n"""',
        ]
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops += [s for s in ("<|im_end|>", "<|im_start|>") if s not in stops]
    else:
        lines.append("# TEMPLATE: Ollama takes the chat template from the GGUF (tokenizer.chat_template).")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _default_system(tokenizer: Any) -> str | None:
    """The system message the chat template adds when a conversation has none (SmolLM2's)."""
    marker = "\x00user\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head) or "<|im_end|>" not in text:
        return None
    system = text[len(head) : text.index("<|im_end|>")]
    return system if marker not in system and '"""' not in system else None


def export(
    run: str | Path,
    output: str | Path,
    *,
    fmt: str = "gguf",
    topic: str | None = None,
    quantize: str | None = None,
    model: str | None = None,
) -> Path:
    """Export a run's adapter (its last topic's, or ``topic``'s) into ``output`` (new or empty)."""
    from align.card import base_model_id, run_card
    from align.core.rundir import staged_directory
    from align.tools.loading import load
    from align.tools.merging import check_empty_output
    from align.tools.runs import run_adapter

    quantize = check_options(fmt, quantize)
    output = check_empty_output(output)
    adapter = run_adapter(run, topic)
    loaded = load(adapter, model, full_precision=True)
    base = base_model_id(loaded.settings.get("path"))
    name = f"{Path(run).resolve().name}-{adapter.name}"
    try:
        with staged_directory(output, readable=True) as staging:
            if fmt == "gguf":
                merged = loaded.model.merge_and_unload()
                write_model_gguf(
                    merged, loaded.tokenizer, staging / MODEL_FILE, quantize=quantize, name=name, base=base
                )
                (staging / "Modelfile").write_text(chatml_modelfile(loaded.tokenizer), encoding="utf-8")
                files = [("model", MODEL_FILE), ("Ollama", "Modelfile")]
            else:
                write_lora_gguf(loaded.model, staging / ADAPTER_FILE, quantize=quantize, name=name)
                files = [("adapter", ADAPTER_FILE)]
            details = [*files, ("quantization", quantize), ("adapter", adapter.name)]
            card = run_card(fmt, adapter, details=details)
            (staging / "README.md").write_text(card, encoding="utf-8")
            check_empty_output(output)  # nothing appeared there while the model was written
    except BaseException as exc:
        from align.core.runner import WRITE_ERRNOS

        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise AlignError(
                f"{output}: could not write {exc.filename or 'the export'}: {exc.strerror}; "
                "nothing was kept: fix that and export again"
            ) from exc
        raise
    return output
