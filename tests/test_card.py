"""Model cards: every adapter a run saves and every merged model carries a Hugging Face card."""

import json

import pytest
import yaml
from click.testing import CliRunner

from align.card import base_model_id, front_matter, model_card
from align.cli import cli


def card_of(directory):
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text


def test_each_saved_adapter_has_a_card_with_its_topics_settings_and_metrics(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    for index, entry in enumerate(summary["topics"]):
        meta, text = card_of(tiny_run / entry["adapter"])
        assert "[More Information Needed]" not in text  # PEFT's template card is gone
        assert meta["library_name"] == "peft"
        assert "peft" in meta["tags"] and "lora" in meta["tags"]
        # The tiny model is a local directory: no hub id, and never its path.
        assert "base_model" not in meta and "license" not in meta
        assert str(tiny_run.parent) not in text.split("\n---\n", 1)[0]
        assert meta["align_topics"] == [t["topic"] for t in summary["topics"][: index + 1]]
        assert "| `lora.alpha` | 32 |" in text
        for step in entry["steps"]:
            for metric, value in step["metrics"].items():
                assert f"| {entry['topic']} | {step['step']} | `{metric}` | {value:.4g} |" in text
        for earlier, metrics in entry.get("recheck", {}).items():
            for metric, value in metrics.items():
                assert f"| {earlier} | recheck | `{metric}` | {value:.4g} |" in text


def test_the_packaged_default_is_named_by_its_hub_id_and_license():
    card = model_card(
        "adapter", config={"model": {"path": "smollm2"}}, results=[{"topic": "home", "steps": []}]
    )
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["base_model_relation"] == "adapter"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"]
    merged = front_matter(model_card("merged", config={"model": {"path": "smollm2"}}, results=[]))
    assert merged["library_name"] == "transformers" and merged["base_model_relation"] == "finetune"


def test_base_model_id_is_a_hub_id_or_nothing(tmp_path):
    assert base_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert base_model_id(str(tmp_path / "org" / "model")) is None
    assert base_model_id("./models/x") is None and base_model_id(None) is None


def test_a_topic_name_that_would_break_the_yaml_or_the_table_is_quoted():
    card = model_card("adapter", config={}, results=[{"topic": "a: b | c\n---", "steps": []}])
    assert front_matter(card)["align_topics"] == ["a: b | c\n---"]


def test_merge_writes_a_merged_models_card(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(tiny_run), "--topic", "first", "--output", str(out)])
    assert result.exit_code == 0, result.output
    meta, text = card_of(out)
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert meta["align_topics"] == ["first"]
    assert "| first | after_dpo | `quiz.accuracy` |" in text


@pytest.mark.parametrize("kind", ["model", ""])
def test_an_unknown_kind_is_a_programming_error(kind):
    with pytest.raises(ValueError):
        model_card(kind, config={}, results=[])
