"""model.chat_template: what the loaded tokenizer does with prompts."""

from pathlib import Path

import pytest

from align.hf.language_model import HFLanguageModel
from align.hf.loading import load_model


@pytest.mark.parametrize(("setting", "chat"), [("auto", True), (True, True), (False, False)])
def test_chat_template_setting_decides_how_prompts_are_formatted(tiny_model_dir, setting, chat):
    model, tokenizer = load_model(str(tiny_model_dir), chat_template=setting)
    prompt = HFLanguageModel(model, tokenizer).format_prompt("Where do you live?")
    assert prompt.startswith("<|im_start|>user\n") is chat
    assert ("<|im_start|>assistant\n" in prompt) is chat
    if not chat:
        assert prompt == "Where do you live?"


def test_the_adapter_starts_the_same_whether_or_not_loading_drew_random_numbers(
    tiny_model_dir, registry, tmp_path, monkeypatch
):
    """The first run after install converts the packaged GGUF, which builds a model from its config
    and so draws random numbers between the run's seeding and the adapter's initialisation; the
    adapter must start from the same weights as on every later run."""
    import torch

    import align.hf.loading
    from align.core.plan import resolve_plan
    from align.core.runner import load_policy
    from align.testing import make_topic

    config = {"seed": 3, "model": {"path": str(tiny_model_dir)}, "protocol": [{"evaluate": ["quiz"]}]}
    plan = resolve_plan(config, "<test>", registry, topics=[make_topic()])

    def initial_adapter():
        policy = load_policy(plan, tmp_path / "scratch")
        return {name: tensor.clone() for name, tensor in policy.snapshot().items()}

    torch.manual_seed(plan.config["seed"])  # as execute seeds before loading
    plain = initial_adapter()
    real_load_model = align.hf.loading.load_model

    def converting_load_model(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        torch.randn(10_000)  # what building a model from its config does to the random state
        return loaded

    monkeypatch.setattr(align.hf.loading, "load_model", converting_load_model)
    torch.manual_seed(plan.config["seed"])
    converting = initial_adapter()
    assert plain.keys() == converting.keys() and plain
    assert any(bool(tensor.abs().sum()) for tensor in plain.values())  # lora_A is drawn at random
    for name in plain:
        assert torch.equal(plain[name], converting[name]), name


def test_a_gguf_file_is_converted_once_and_loads_as_the_model_it_holds(tmp_path, monkeypatch):
    """``--model FILE.gguf`` is accepted as the packaged GGUF is: converted into the cache on first
    use (the same weights and tokenizer), reused after, converted again when the file changes."""
    pytest.importorskip("gguf")
    import torch

    from align.hf.source import resolve_model_path
    from align.testing import save_tiny_gguf, tiny_causal_lm

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    gguf = save_tiny_gguf(tmp_path / "tiny.gguf")
    converted = resolve_model_path(str(gguf))
    assert converted.startswith(str(tmp_path / "cache" / "models" / "tiny-"))
    model, tokenizer = load_model(str(gguf))
    expected, expected_tokenizer = tiny_causal_lm()
    ids = expected_tokenizer("Wrackhouse, gull.", return_tensors="pt").input_ids
    assert tokenizer("Wrackhouse, gull.").input_ids == ids[0].tolist()
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)
    assert tokenizer.chat_template
    stamp = Path(converted, "config.json").stat().st_mtime_ns
    assert resolve_model_path(str(gguf)) == converted  # cached: not converted again
    assert Path(converted, "config.json").stat().st_mtime_ns == stamp
    save_tiny_gguf(gguf, seed=1)  # another model under the same name
    assert resolve_model_path(str(gguf)) != converted


def test_align_run_and_validate_take_a_gguf_file(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from click.testing import CliRunner

    from align.cli import cli
    from align.testing import save_tiny_gguf

    from ..conftest import write_topic

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    save_tiny_gguf(tmp_path / "tiny.gguf")
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "alpha")
    config = tmp_path / "config.yaml"
    config.write_text("model: {path: tiny.gguf}\nprotocol: [{name: before, evaluate: [quiz]}]\n")
    result = CliRunner().invoke(cli, ["validate", str(config), "--topics", str(topics)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "cache").exists()  # validate checks the file, and converts nothing
    args = ["run", str(config), "--topics", str(topics), "--output", str(tmp_path / "out"), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "summary.json").is_file()
    assert list((tmp_path / "cache" / "models").iterdir())


def test_a_conversion_another_process_finished_first_is_kept(tmp_path):
    """Two processes converting the same GGUF file at once: the one that finishes second keeps the
    other's directory and leaves no staging directory behind."""
    pytest.importorskip("gguf")
    from align.hf.source import convert_gguf
    from align.testing import save_tiny_gguf

    gguf = save_tiny_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "cache" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # the other process's copy
    convert_gguf(gguf, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]
    convert_gguf(gguf, tmp_path / "cache" / "fresh")
    assert (tmp_path / "cache" / "fresh" / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["fresh", "tiny"]
