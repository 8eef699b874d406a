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
