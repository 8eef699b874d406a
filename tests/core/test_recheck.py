"""Forgetting across topics: after each topic the engine evaluates every earlier topic again."""

import io

import pytest

from align.console import ConsoleReporter
from align.core.plan import resolve_plan
from align.core.runner import execute
from align.errors import ConfigError, RunStopped
from align.testing import PluginHarness, StubEvaluator, StubObjective, StubPlugin, StubPolicy, make_topic

PROTOCOL = [
    {"name": "before", "evaluate": ["quiz", "voice"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["quiz", "voice"]},
    {"name": "dpo", "train": "dpo", "gate": {"use": "threshold", "all": ["quiz.accuracy >= 2"]}},
    {"name": "after_dpo", "evaluate": ["quiz"], "if_ran": "dpo"},
]
TOPICS = [make_topic(name=name) for name in ("t1", "t2", "t3")]


class Crash(KeyboardInterrupt):
    """Stands in for the process dying during the recheck (like Ctrl-C, no step handles it)."""


def learn(policy, topic):
    """Training a topic teaches it (0.75) and costs every topic learnt before 0.25."""
    for name in policy.state:
        policy.state[name] -= 0.25
    policy.state[topic.name] = 0.75


def harness_for(state, voice=None):
    """``quiz.accuracy`` is what the adapter (``state``) knows of the topic; ``voice.score`` half of it.
    ``voice(topic, state)`` may raise, to fail or crash an evaluation."""

    def voice_metrics(model, topic):
        if voice is not None:
            voice(topic, state)
        return {"score": state.get(topic.name, 0.0) / 2}

    quiz = StubEvaluator(lambda model, topic: {"accuracy": state.get(topic.name, 0.0)})
    harness = PluginHarness(builtins=["threshold"])
    harness.register(
        StubPlugin(
            objectives={"sft": StubObjective(effect=learn), "dpo": StubObjective()},
            evaluators={"quiz": quiz, "voice": StubEvaluator(voice_metrics)},
        )
    )
    return harness, quiz


def run(tmp_path, voice=None, resume=False, name="run", reporter=None, **config):
    state = {}
    harness, quiz = harness_for(state, voice)
    data = {"protocol": PROTOCOL, "output": str(tmp_path / name), **config}
    plan = resolve_plan(data, "<test>", harness.registry, topics=TOPICS)
    policy = StubPolicy(state=state, scratch_dir=tmp_path / "scratch")
    summary = execute(plan, reporter=reporter, policy=policy, hooks=harness.manager, resume=resume)
    return summary, quiz


def events(tmp_path, name="run"):
    import json

    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_forgetting_matrix_holds_each_topic_after_every_later_one(tmp_path):
    summary, _ = run(tmp_path)
    assert summary["forgetting"] == {
        "topics": ["t1", "t2", "t3"],
        "metrics": {
            "quiz.accuracy": [
                [0.75, None, None],
                [0.5, 0.75, None],
                [0.25, 0.5, 0.75],
            ],
            "voice.score": [
                [0.375, None, None],
                [0.25, 0.375, None],
                [0.125, 0.25, 0.375],
            ],
        },
        # ACC: the last row's mean; BWT: the earlier topics' mean change since their own training.
        "acc": {"quiz.accuracy": 0.5, "voice.score": 0.25},
        "bwt": {"quiz.accuracy": -0.375, "voice.score": -0.1875},
    }
    assert summary["topics"][2]["recheck"] == {
        "t1": {"quiz.accuracy": 0.25, "voice.score": 0.125},
        "t2": {"quiz.accuracy": 0.5, "voice.score": 0.25},
    }
    assert "recheck" not in summary["topics"][0]
    assert isinstance(summary["topics"][2]["recheck_seconds"], float)


def test_one_recheck_event_per_earlier_topic_each_evaluator_once(tmp_path):
    _, quiz = run(tmp_path)
    rechecks = [e for e in events(tmp_path) if e["kind"] == "recheck"]
    assert [(e["topic"], e["step"], e["target"], e["metrics"]) for e in rechecks] == [
        ("t2", "recheck", "t1", {"quiz.accuracy": 0.5, "voice.score": 0.25}),
        ("t3", "recheck", "t1", {"quiz.accuracy": 0.25, "voice.score": 0.125}),
        ("t3", "recheck", "t2", {"quiz.accuracy": 0.5, "voice.score": 0.25}),
    ]
    # quiz is in three evaluation steps, but rechecks each earlier topic once
    assert quiz.calls == ["t1", "t1", "t2", "t2", "t1", "t3", "t3", "t1", "t2"]
    kinds = [(e["topic"], e["kind"]) for e in events(tmp_path) if e["topic"] == "t2"]
    assert kinds[-1] == ("t2", "recheck")  # after the topic's last step


def test_the_diagonal_is_the_topics_own_last_evaluation_even_after_a_partial_row(tmp_path):
    summary, _ = run(tmp_path)
    for metric, matrix in summary["forgetting"]["metrics"].items():
        for i, topic in enumerate(summary["topics"]):
            last = [s for s in topic["steps"] if s["kind"] == "eval" and s["status"] == "ran"][-1]
            assert matrix[i][i] == last["metrics"][metric]


def test_the_console_shows_rechecks_and_flags_what_was_forgotten(tmp_path):
    stream = io.StringIO()
    run(tmp_path, reporter=ConsoleReporter(stream))
    lines = stream.getvalue().splitlines()
    assert "  recheck    t1: quiz.accuracy 0.25  voice.score 0.12" in lines
    # the topic column is as wide as the longest topic name ('after' heads it)
    assert "t1     0.75 -> 0.25  (-0.50, forgot)" in lines
    assert "t2     0.75 -> 0.50  (-0.25, forgot)" in lines


def test_recheck_none_records_nothing_and_leaves_forgetting_out(tmp_path):
    summary, quiz = run(tmp_path, recheck="none")
    assert "forgetting" not in summary
    assert not [e for e in events(tmp_path) if e["kind"] == "recheck"]
    assert all("recheck" not in topic for topic in summary["topics"])
    assert quiz.calls == ["t1", "t1", "t2", "t2", "t3", "t3"]


def test_a_single_topic_has_a_one_cell_matrix(tmp_path):
    state = {}
    harness, _ = harness_for(state)
    plan = resolve_plan(
        {"protocol": PROTOCOL, "output": str(tmp_path / "run")}, "<test>", harness.registry, topics=TOPICS[:1]
    )
    summary = execute(plan, policy=StubPolicy(state=state), hooks=harness.manager)
    assert summary["forgetting"] == {
        "topics": ["t1"],
        "metrics": {"quiz.accuracy": [[0.75]], "voice.score": [[0.375]]},
        "acc": {"quiz.accuracy": 0.75, "voice.score": 0.375},
        "bwt": {"quiz.accuracy": None, "voice.score": None},
    }


def run_failing(tmp_path, exception, resume=False, during="t2", **config):
    """Like :func:`run`, but voice raises ``exception`` (if any) on t1 once ``during`` is trained:
    in rechecks only."""

    def voice(topic, state):
        if exception is not None and topic.name == "t1" and during in state:
            raise exception

    summary, _ = run(tmp_path, voice=voice, resume=resume, **config)
    return summary


def test_a_failed_recheck_with_on_error_skip_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    summary = run_failing(tmp_path, RuntimeError("out of cheese"), on_error="skip")
    assert summary["status"] == "completed"
    errors = [e for e in events(tmp_path) if e["kind"] == "error"]
    assert [(e["topic"], e["step"], e["target"], e["component"]) for e in errors] == [
        ("t2", "recheck", "t1", "voice"),
        ("t3", "recheck", "t1", "voice"),
    ]
    assert "RuntimeError: out of cheese" in errors[0]["reason"]
    assert summary["topics"][1]["recheck"] == {"t1": {"quiz.accuracy": 0.5}}
    assert summary["forgetting"]["metrics"]["voice.score"][1] == [None, 0.375, None]
    assert summary["forgetting"]["metrics"]["quiz.accuracy"][1] == [0.5, 0.75, None]


def test_a_failed_recheck_stops_the_run_and_resume_redoes_it(tmp_path):
    with pytest.raises(RunStopped, match=r"topic 't2', recheck of 't1': evaluator 'voice' .*failed"):
        run_failing(tmp_path, RuntimeError("out of cheese"))
    stopped = events(tmp_path)
    assert [e["kind"] for e in stopped if e["topic"] == "t2"][-1] == "error"
    assert not [e for e in stopped if e["kind"] == "recheck"]

    summary = run_failing(tmp_path, None, resume=True)
    expected, _ = run(tmp_path, name="whole")
    assert summary["status"] == "completed"
    assert summary["forgetting"] == expected["forgetting"]
    rechecks = [(e["topic"], e["target"]) for e in events(tmp_path) if e["kind"] == "recheck"]
    assert rechecks == [("t2", "t1"), ("t3", "t1"), ("t3", "t2")]
    errors = [(e["topic"], e["step"], e["target"]) for e in events(tmp_path) if e["kind"] == "error"]
    assert errors == [("t2", "recheck", "t1")]  # the failure stays on record


@pytest.mark.parametrize("during", ["t2", "t3"])
def test_a_run_killed_during_the_recheck_resumes_to_the_same_matrix(tmp_path, during):
    with pytest.raises(Crash):
        run_failing(tmp_path, Crash(), during=during)
    summary = run_failing(tmp_path, None, resume=True)
    expected, _ = run(tmp_path, name="whole")
    assert summary["forgetting"] == expected["forgetting"]
    assert [s["metrics"] for t in summary["topics"] for s in t["steps"]] == [
        s["metrics"] for t in expected["topics"] for s in t["steps"]
    ]
    rechecks = [(e["topic"], e["target"]) for e in events(tmp_path) if e["kind"] == "recheck"]
    assert rechecks == [("t2", "t1"), ("t3", "t1"), ("t3", "t2")]
    assert [e["at"] for e in events(tmp_path) if e["kind"] == "resume"] == [
        f"topic '{during}': rechecking earlier topics and saving its adapter"
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "recheck",
            "earler",
            "recheck: expected one of earlier, none, got 'earler'; did you mean 'earlier'?",
        ),
        ("recheck", True, "recheck: expected one of earlier, none, got True"),
        ("report_to", "tensorbord", "did you mean 'tensorboard'?"),
    ],
)
def test_recheck_and_report_to_are_checked(key, value, message):
    harness, _ = harness_for({})
    with pytest.raises(ConfigError, match="<test>: ") as excinfo:
        resolve_plan({"protocol": PROTOCOL, key: value}, "<test>", harness.registry, topics=TOPICS)
    assert message in str(excinfo.value)
