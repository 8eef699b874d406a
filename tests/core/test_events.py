"""The events path (align.core.events): one bus, its subscribers in a fixed order, hooks isolated."""

import json
from types import SimpleNamespace

import pytest

from align import hookimpl
from align.core.events import (
    Checkpointer,
    Console,
    EventBus,
    Hooks,
    Recorded,
    Reporter,
    RunLog,
    StepEnded,
    Warned,
)
from align.core.results import StepResult
from align.errors import RunStopped
from align.plugins.lifecycle import Lifecycle
from align.plugins.manager import new_plugin_manager, register_plugin
from align.testing import PluginHarness, StubObjective, StubPlugin, StubPolicy, make_topic


def test_the_bus_hands_each_event_to_every_subscriber_in_the_order_given():
    heard = []
    bus = EventBus([lambda e: heard.append(("first", e)), lambda e: heard.append(("second", e))])
    bus.emit("a")
    bus.emit("b")
    assert heard == [("first", "a"), ("second", "a"), ("first", "b"), ("second", "b")]


def test_a_subscriber_that_raises_stops_that_event_there():
    heard = []

    def broken(event):
        raise OSError("disk full")

    bus = EventBus([heard.append, broken, heard.append])
    with pytest.raises(OSError, match="disk full"):
        bus.emit("a")
    assert heard == ["a"]


def make_engine(out, plugins, reporter=None):
    """The real engine over a stub policy, with ``plugins`` registered, writing into ``out``."""
    from align.core.config import dump_config
    from align.core.engine import Engine
    from align.core.plan import resolve_plan
    from align.core.rundir import RunDir

    harness = PluginHarness(builtins=False)
    for plugin in plugins:
        harness.register(plugin)
    config = {"protocol": [{"name": "sft", "train": "sft"}]}
    plan = resolve_plan(config, "<test>", harness.registry, topics=[make_topic()])
    rundir = RunDir(out)
    rundir.create(dump_config(plan.config))
    policy = StubPolicy(seed=0, scratch_dir=rundir.scratch_dir)
    return Engine(plan, policy, rundir, reporter=reporter, hooks=harness.manager)


def test_the_engine_subscribes_the_metrics_log_checkpoint_console_then_hooks(tmp_path):
    engine = make_engine(tmp_path / "run", [StubPlugin(objectives={"sft": StubObjective()})])
    assert [type(s) for s in engine.bus.subscribers] == [RunLog, Checkpointer, Console, Hooks]
    engine.rundir.close()


def test_a_hook_hears_of_a_step_after_its_metrics_line_checkpoint_and_console_line(tmp_path):
    out = tmp_path / "run"
    order = []

    class Lines(Reporter):
        def step_end(self, topic, result):
            order.append(("console", result.name))

    class Watcher:
        @hookimpl
        def on_step_end(self, topic, step, result):
            state = json.loads((out / "checkpoint" / "state.json").read_text())
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            order.append(("hook", step))
            order.append(("metrics line", any(e["step"] == step and e["kind"] == "train" for e in lines)))
            order.append(
                ("checkpoint after the step", state["step_index"], state["current"]["steps"][-1]["step"])
            )

    engine = make_engine(out, [StubPlugin(objectives={"sft": StubObjective()}), Watcher()], reporter=Lines())
    engine.run()
    assert order == [
        ("console", "sft"),
        ("hook", "sft"),
        ("metrics line", True),
        ("checkpoint after the step", 1, "sft"),
    ]


class Broken:
    @hookimpl
    def on_step_end(self, topic, step, result):
        raise ValueError("tracker down")


class Listening:
    def __init__(self):
        self.heard = []

    @hookimpl
    def on_step_end(self, topic, step, result):
        self.heard.append((topic.name, step, result["status"]))


def hooks_for(on_error, *plugins):
    manager = new_plugin_manager()
    for plugin in plugins:
        register_plugin(manager, plugin)
    heard = []
    engine = SimpleNamespace(
        on_error=on_error,
        status="running",
        current_topic="t",
        current_step="sft",
        bus=EventBus([heard.append]),
        stopped=lambda what, fix: RunStopped(f"{what}; {fix}"),
    )
    return Hooks(Lifecycle(manager), engine), heard


def step_ended():
    return StepEnded(make_topic(name="t"), 0, 0, StepResult("sft", "train", "ran"))


def test_a_failing_hook_is_isolated_recorded_and_warned_with_on_error_skip():
    listening = Listening()
    hooks, heard = hooks_for("skip", Broken(), listening)
    hooks(step_ended())
    assert listening.heard == [("t", "sft", "ran")]  # the other plugin still heard of the step
    recorded = [e for e in heard if isinstance(e, Recorded)]
    assert [(e.topic, e.step, e.kind, e.extra["hook"], e.extra["error"]) for e in recorded] == [
        ("t", "sft", "hook_error", "on_step_end", "ValueError: tracker down")
    ]
    warned = [e.message for e in heard if isinstance(e, Warned)]
    assert len(warned) == 1
    assert "raised in on_step_end (topic 't', step 'sft'): ValueError: tracker down" in warned[0]
    assert heard.index(recorded[0]) < heard.index(next(e for e in heard if isinstance(e, Warned)))


def test_a_failing_hook_stops_the_run_with_on_error_stop_after_the_others_ran():
    listening = Listening()
    hooks, heard = hooks_for("stop", Broken(), listening)
    with pytest.raises(RunStopped, match=r"raised in on_step_end.*ALIGN_DISABLE_PLUGINS="):
        hooks(step_ended())
    assert listening.heard == [("t", "sft", "ran")]
    assert [e.kind for e in heard if isinstance(e, Recorded)] == ["hook_error"]
    assert not [e for e in heard if isinstance(e, Warned)]
