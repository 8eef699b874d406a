"""model.chat_template: what the loaded tokenizer does with prompts."""

import pytest

from align.core.model import HFLanguageModel, load_model


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

    import align.core.model
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
    real_load_model = align.core.model.load_model

    def converting_load_model(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        torch.randn(10_000)  # what building a model from its config does to the random state
        return loaded

    monkeypatch.setattr(align.core.model, "load_model", converting_load_model)
    torch.manual_seed(plan.config["seed"])
    converting = initial_adapter()
    assert plain.keys() == converting.keys() and plain
    assert any(bool(tensor.abs().sum()) for tensor in plain.values())  # lora_A is drawn at random
    for name in plain:
        assert torch.equal(plain[name], converting[name]), name
