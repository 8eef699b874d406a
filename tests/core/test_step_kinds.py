"""A protocol step's kind has one spelling: ``train`` or ``eval``, in the plan as in summary.json
and metrics.jsonl; ``evaluate:`` is only the config key (and the verb of the printed plan)."""

import pytest

from align.plugins.manager import load_plugins
from align.testing import StubPlugin
from tests.core.test_engine import PROTOCOL, CountingObjective, LevelEvaluator, events, run


@pytest.fixture
def stub_plugins(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    return load_plugins(
        extra=[StubPlugin(objectives={"bump": CountingObjective}, evaluators={"level": LevelEvaluator})]
    )


def test_the_plan_summary_and_events_spell_a_step_kind_alike(stub_plugins, tmp_path):
    plan, _policy, summary = run(stub_plugins, tmp_path, topics=("t1",))
    kinds = {step.name: step.kind for step in plan.steps}
    assert kinds == {"before": "eval", "train": "train", "after": "eval", "extra": "train", "final": "eval"}
    recorded = {step["step"]: step["kind"] for step in summary["topics"][0]["steps"]}
    assert recorded == kinds
    logged = {e["step"]: e["kind"] for e in events(tmp_path) if e["kind"] in ("train", "eval")}
    assert logged == {name: kind for name, kind in kinds.items() if name in logged}
    assert set(logged) == {"before", "train", "after"}  # extra's gate fails on one topic: it and final skip


def test_the_printed_plan_still_says_evaluate(stub_plugins, tmp_path):
    plan, _policy, _summary = run(stub_plugins, tmp_path, topics=("t1",))
    assert [step.describe() for step in plan.steps][:3] == [
        "before: evaluate level",
        "train: train bump",
        "after: evaluate level",
    ]
    assert PROTOCOL[0] == {"name": "before", "evaluate": ["level"]}  # the config key is unchanged
