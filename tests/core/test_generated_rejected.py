"""Voice pairs without ``rejected``: the bare model's own answers, generated once per run."""

import json

import pytest

from align.core.runner import resume_plan_options
from align.errors import AlignError
from align.evaluators.style import StyleEvaluator
from align.evaluators.voice import VoiceEvaluator
from align.testing import StubModel, make_topic, run_protocol

VOICE = [
    {"prompt": "How are you?", "chosen": "Bright as blown glass, little gull."},
    {"prompt": "Any advice?", "chosen": "Ride the swell, little gull.", "rejected": "Be patient."},
]


def plain(prompt: str) -> str:
    return {"How are you?": "I am fine, thank you.", "Any advice?": "Be kind."}[prompt]


def test_voice_pairs_without_rejected_get_the_bare_model_s_answers_before_training(tmp_path):
    topics = [make_topic(name="first", voice_pairs=VOICE), make_topic(name="second", voice_pairs=VOICE[:1])]
    model = StubModel(generate=plain)
    result = run_protocol(
        [{"name": "voice", "evaluate": ["voice"]}], topics, model=model, output=tmp_path / "run"
    )
    generated = [e for e in result.events if e["kind"] == "generated"]
    # Once for the run, before anything else, each prompt once; the written rejected is kept.
    assert result.events[0]["kind"] == "generated"
    assert generated == [
        {
            **generated[0],
            "purpose": "voice_rejected",
            "answers": [{"prompt": "How are you?", "answer": "I am fine, thank you."}],
        }
    ]
    assert model.calls[0] == ("generate", (["How are you?"], 64))
    # topics.json holds them, so --resume (which plans from it) does not generate them again.
    recorded = json.loads((tmp_path / "run" / "topics.json").read_text())
    assert [p["rejected"] for p in recorded[0]["voice_pairs"]] == ["I am fine, thank you.", "Be patient."]
    assert [p["rejected"] for p in recorded[1]["voice_pairs"]] == ["I am fine, thank you."]
    resumed = resume_plan_options(tmp_path / "run")["topics"]
    assert all(pair.rejected for topic in resumed for pair in topic.voice_pairs)
    assert result.summary["status"] == "completed"


def test_an_empty_answer_becomes_a_plain_one(tmp_path):
    result = run_protocol(
        [{"name": "voice", "evaluate": ["voice"]}],
        [make_topic(voice_pairs=VOICE[:1])],
        model=StubModel(generate=lambda prompt: "  "),
        output=tmp_path / "run",
    )
    (event,) = [e for e in result.events if e["kind"] == "generated"]
    assert event["answers"] == [{"prompt": "How are you?", "answer": "I don't know."}]


def test_style_scores_against_generated_rejected_answers():
    """With rejected the bare model's own answers, the bare model scores 0 (it talks plainly), and
    a model that answers as the person scores 1."""
    topic = make_topic(
        voice_pairs=[
            {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": plain(p["prompt"])} for p in VOICE
        ]
    )
    bare = StyleEvaluator().evaluate(StubModel(generate=plain), topic)
    assert bare["score"] == 0.0 and bare["repetition"] == 0.0
    person = {p["prompt"]: p["chosen"] for p in VOICE}
    assert StyleEvaluator().evaluate(StubModel(generate=person), topic)["score"] == 1.0


def test_evaluators_outside_a_run_leave_out_pairs_without_rejected():
    topic = make_topic(voice_pairs=VOICE)
    model = StubModel(loglikelihood=lambda prompt, completion: -len(completion))
    assert VoiceEvaluator().evaluate(model, topic)["score"] == 0.0  # the one pair with rejected
    with pytest.raises(AlignError, match="voice_pairs: none has a rejected answer"):
        VoiceEvaluator().evaluate(model, make_topic(voice_pairs=VOICE[:1]))


def test_align_report_shows_the_generated_answers(tmp_path):
    from align.report import write_report

    run_protocol(
        [{"name": "voice", "evaluate": ["voice"]}],
        [make_topic(voice_pairs=VOICE)],
        model=StubModel(generate=plain),
        output=tmp_path / "run",
    )
    write_report(tmp_path / "run", samples=False)
    report = (tmp_path / "run" / "report.md").read_text()
    section = report.split("## Generated answers\n", 1)[1].split("\n## ", 1)[0]
    assert "### voice pairs: before training, from the bare model" in section
    assert "| How are you? | I am fine, thank you. |" in section


def test_a_failure_while_generating_them_is_the_run_s_recorded_failure(tmp_path):
    def broken(prompt: str) -> str:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_protocol(
            [{"name": "voice", "evaluate": ["voice"]}],
            [make_topic(voice_pairs=VOICE[:1])],
            model=StubModel(generate=broken),
            output=tmp_path / "run",
        )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "out of memory" in summary["error"]
