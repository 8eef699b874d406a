"""Lifecycle hooks and rollback guards, run through the real engine with stubs (align.testing)."""

import json

import pytest

from align import hookimpl
from align.errors import ConfigError, RunStopped
from align.testing import StubEvaluator, StubObjective, StubPlugin, make_topic, run_protocol

PROTOCOL = [
    {"name": "before", "evaluate": ["probe"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["probe"]},
    {"name": "dpo", "train": "dpo"},
    {
        "name": "after_dpo",
        "evaluate": ["probe"],
        "rollback": {"step": "dpo", "max_drop": {"probe.know": 0.05}},
    },
    {"name": "final", "evaluate": ["probe"]},
]


def knowledge_plugin(dpo_change):
    """sft adds 0.5 knowledge; dpo changes it by ``dpo_change``; the probe reports it."""

    def sft(policy, topic):
        policy.state["know"] = policy.state.get("know", 0.0) + 0.5

    def dpo(policy, topic):
        policy.state["know"] = policy.state.get("know", 0.0) + dpo_change
        policy.state["voice"] = policy.state.get("voice", 0.0) + 1

    state: dict = {}
    probe = StubEvaluator(
        lambda model, topic: {"know": state.get("know", 0.0), "voice": state.get("voice", 0.0)}
    )
    plugin = StubPlugin(
        objectives={"sft": StubObjective(effect=sft), "dpo": StubObjective(effect=dpo)},
        evaluators={"probe": probe},
    )
    return plugin, state


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def on_run_start(self, plan, output):
        self.calls.append(("run_start", len(plan.topics)))

    @hookimpl
    def on_topic_start(self, topic, index, total):
        self.calls.append(("topic_start", topic.name, index, total))

    @hookimpl
    def on_step_end(self, topic, step, result):
        self.calls.append(("step_end", topic.name, step, result["status"]))

    @hookimpl
    def on_topic_end(self, topic, result):
        self.calls.append(("topic_end", topic.name, result["adapter"]))

    @hookimpl
    def on_run_end(self, summary):
        self.calls.append(("run_end", summary["status"]))


def test_lifecycle_hooks_see_every_event_in_order():
    plugin, state = knowledge_plugin(0.0)
    recorder = Recorder()
    topics = [make_topic(name="a"), make_topic(name="b")]
    run_protocol(PROTOCOL[:3], topics, plugins=[plugin, recorder], builtins=False, state=state)
    steps = [("step_end", t, s, "ran") for t in "ab" for s in ("before", "sft", "after_sft")]
    assert recorder.calls == [
        ("run_start", 2),
        ("topic_start", "a", 0, 2),
        *steps[:3],
        ("topic_end", "a", "adapters/a"),
        ("topic_start", "b", 1, 2),
        *steps[3:],
        ("topic_end", "b", "adapters/b"),
        ("run_end", "completed"),
    ]


def test_on_step_end_gets_gate_decisions_and_skips():
    seen = {}

    class Watch:
        @hookimpl
        def on_step_end(self, step, result):
            seen[step] = result

    plugin = StubPlugin(
        objectives={"dpo": StubObjective()}, evaluators={"probe": StubEvaluator({"know": 0.2})}
    )
    protocol = [
        {"name": "check", "evaluate": ["probe"]},
        {"name": "dpo", "train": "dpo", "gate": {"use": "threshold", "all": ["probe.know >= 0.7"]}},
    ]
    run_protocol(protocol, plugins=[plugin, Watch()], builtins=["threshold"])
    assert seen["check"]["metrics"] == {"probe.know": 0.2}
    assert seen["dpo"]["status"] == "skipped"
    assert seen["dpo"]["gate"]["passed"] is False
    assert "probe.know 0.20" in seen["dpo"]["gate"]["reason"]


class BrokenTracker:
    @hookimpl
    def on_step_end(self, step, result):
        raise RuntimeError(f"tracker offline at {step}")


def test_with_on_error_skip_a_raising_hook_is_reported_with_its_plugin_and_the_run_finishes():
    recorder = Recorder()
    plugin, state = knowledge_plugin(0.0)
    result = run_protocol(
        PROTOCOL[:3],
        plugins=[plugin, BrokenTracker(), recorder],
        builtins=False,
        state=state,
        config={"on_error": "skip"},
    )
    assert result.summary["status"] == "completed"
    assert ("run_end", "completed") in recorder.calls  # other plugins still called
    errors = [e for e in result.events if e["kind"] == "hook_error"]
    assert len(errors) == 3
    assert errors[0]["hook"] == "on_step_end"
    assert errors[0]["plugin"] == "BrokenTracker"
    assert errors[0]["error"] == "RuntimeError: tracker offline at before"
    assert (result.path / "adapters" / "topic" / "stub_adapter.json").exists()


def test_by_default_a_raising_hook_stops_the_run_cleanly_and_resume_goes_on_after_it(tmp_path):
    recorder = Recorder()
    plugin, state = knowledge_plugin(0.0)
    with pytest.raises(RunStopped) as stopped:
        run_protocol(
            PROTOCOL[:3],
            plugins=[plugin, BrokenTracker(), recorder],
            state=state,
            builtins=False,
            output=tmp_path / "run",
        )
    message = str(stopped.value)
    assert message.startswith(
        "plugin 'BrokenTracker' raised in on_step_end (topic 'topic', step 'before'): "
        "RuntimeError: tracker offline at before; results so far are kept"
    )
    assert "ALIGN_DISABLE_PLUGINS=BrokenTracker" in message and "align run --resume" in message
    assert recorder.calls[-1] == ("run_end", "failed")  # the other plugins heard the run end
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    state_file = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state_file["next"] == "topic 'topic', step 'sft'"  # the watched step is not redone


def test_a_hook_raising_after_the_run_completed_is_an_error_but_the_results_are_saved(tmp_path):
    class BrokenNotifier:
        @hookimpl
        def on_run_end(self, summary):
            raise ConnectionError("mail server down")

    plugin, state = knowledge_plugin(0.0)
    with pytest.raises(RunStopped, match="the run completed and its results are saved"):
        run_protocol(
            PROTOCOL[:3],
            plugins=[plugin, BrokenNotifier()],
            state=state,
            builtins=False,
            output=tmp_path / "run",
        )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert (tmp_path / "run" / "adapters" / "topic" / "stub_adapter.json").exists()


def test_on_run_end_is_called_with_a_failed_status_when_a_step_raises():
    recorder = Recorder()

    def boom(policy, topic):
        raise ValueError("diverged")

    plugin = StubPlugin(objectives={"sft": StubObjective(effect=boom)})
    with pytest.raises(RunStopped, match="ValueError: diverged"):
        run_protocol([{"name": "sft", "train": "sft"}], plugins=[plugin, recorder], builtins=False)
    assert recorder.calls[-1] == ("run_end", "failed")


def test_rollback_restores_the_adapter_when_the_metric_falls_too_far():
    plugin, state = knowledge_plugin(-0.25)
    result = run_protocol(PROTOCOL, plugins=[plugin], builtins=False, state=state)
    assert result.metrics("topic", "after_sft")["probe.know"] == 0.5
    assert result.metrics("topic", "after_dpo")["probe.know"] == 0.25  # what DPO did, as measured
    rollback = result.step("topic", "after_dpo")["rollback"]
    assert rollback["step"] == "dpo"
    assert rollback["reason"].startswith("probe.know fell 0.50 → 0.25 (more than 0.05) after 'dpo'")
    assert rollback["metrics"] == {"probe.know": 0.5, "probe.voice": 0.0}
    # The adapter (the stub's state) is back to before DPO, so later steps measure that.
    assert result.metrics("topic", "final") == {"probe.know": 0.5, "probe.voice": 0.0}
    assert [e["kind"] for e in result.events if e["step"] == "after_dpo"] == ["eval", "rollback"]


def test_rollback_keeps_the_step_when_the_drop_is_within_tolerance():
    plugin, state = knowledge_plugin(-0.05)
    result = run_protocol(PROTOCOL, plugins=[plugin], builtins=False, state=state)
    assert "rollback" not in result.step("topic", "after_dpo")
    assert result.metrics("topic", "final") == {"probe.know": 0.45, "probe.voice": 1.0}


def test_rollback_on_each_topic_restores_that_topics_own_state():
    plugin, state = knowledge_plugin(-0.25)
    result = run_protocol(
        PROTOCOL, [make_topic(name="a"), make_topic(name="b")], plugins=[plugin], builtins=False, state=state
    )
    assert result.metrics("a", "final")["probe.know"] == 0.5
    assert result.metrics("b", "after_sft")["probe.know"] == 1.0  # b's SFT builds on a's restored state
    assert result.metrics("b", "final")["probe.know"] == 1.0


def test_a_gate_after_a_rollback_reads_the_restored_metrics():
    plugin, state = knowledge_plugin(-0.25)
    plugin.objectives["extra"] = StubObjective()
    protocol = [
        *PROTOCOL[:5],
        {"name": "extra", "train": "extra", "gate": {"use": "threshold", "all": ["probe.know >= 0.5"]}},
    ]
    result = run_protocol(protocol, plugins=[plugin], builtins=["threshold"], state=state)
    assert result.ran("topic", "extra")
    assert result.step("topic", "extra")["gate"]["reason"] == "probe.know 0.50 >= 0.50"


@pytest.mark.parametrize(
    ("rollback", "message"),
    [
        (
            {"step": "sfx", "max_drop": {"probe.know": 0.1}},
            "'sfx' is not an earlier training step; did you mean 'sft'?",
        ),
        ({"step": "dpo"}, "max_drop: expected a mapping of metric to tolerance"),
        ({"step": "dpo", "max_drop": {"probe.know": -1}}, "max_drop.probe.know: expected a number >= 0"),
        (
            {"step": "dpo", "max_drop": {"quiz.accuracy": 0.1}},
            "metric 'quiz.accuracy' is not recorded by this step",
        ),
        ({"step": "dpo", "max_drop": {"probe.know": 0.1}, "when": 1}, "unknown key 'when'"),
    ],
)
def test_bad_rollback_config_is_a_clear_error(rollback, message):
    plugin, state = knowledge_plugin(0.0)
    protocol = [*PROTOCOL[:4], {"name": "after_dpo", "evaluate": ["probe"], "rollback": rollback}]
    with pytest.raises(ConfigError) as info:
        run_protocol(protocol, plugins=[plugin], builtins=False, state=state)
    assert message in str(info.value)


def test_rollback_belongs_on_an_evaluation_step():
    plugin, state = knowledge_plugin(0.0)
    protocol = [
        *PROTOCOL[:3],
        {"name": "dpo", "train": "dpo", "rollback": {"step": "sft", "max_drop": {"probe.know": 0}}},
    ]
    with pytest.raises(ConfigError, match="only an evaluation step can guard a training step"):
        run_protocol(protocol, plugins=[plugin], builtins=False, state=state)


def test_a_rollback_metric_is_checked_against_what_the_evaluators_declare():
    protocol = [
        {"name": "t", "train": "t"},
        {"name": "e", "evaluate": ["quiz"], "rollback": {"step": "t", "max_drop": {"quiz.acc": 0.1}}},
    ]
    with pytest.raises(ConfigError) as info:
        run_protocol(protocol, plugins=[StubPlugin(objectives={"t": StubObjective()})], builtins=["quiz"])
    assert str(info.value).endswith(
        "rollback.max_drop: metric 'quiz.acc' is not recorded by this step; did you mean 'quiz.accuracy'? "
        "(it records: quiz.accuracy, quiz.margin)"
    )


def test_wrappers_and_ordering_options_are_called_through_pluggy():
    calls = []

    class Around:
        @hookimpl(wrapper=True)
        def on_step_end(self, step):
            calls.append(("around before", step))
            result = yield
            calls.append(("around after", step))
            return result

    class OldStyle:
        @hookimpl(hookwrapper=True)
        def on_run_end(self, summary):
            calls.append(("old before", summary["status"]))
            outcome = yield
            outcome.get_result()
            calls.append(("old after", summary["status"]))

    class First:
        @hookimpl(tryfirst=True)
        def on_step_end(self, step):
            calls.append(("first", step))

    class Last:
        @hookimpl(trylast=True)
        def on_step_end(self, step):
            calls.append(("last", step))

    plugin, state = knowledge_plugin(0.0)
    plugins = [plugin, Last(), Around(), OldStyle(), First()]
    run_protocol(PROTOCOL[:1], plugins=plugins, builtins=False, state=state)
    assert calls == [
        ("around before", "before"),
        ("first", "before"),
        ("last", "before"),
        ("around after", "before"),
        ("old before", "completed"),
        ("old after", "completed"),
    ]


class RaisesBeforeYield:
    @hookimpl(wrapper=True)
    def on_step_end(self, step):
        raise RuntimeError("before the yield")
        yield  # never reached; makes the function a generator, as pluggy requires of a wrapper


class RaisesAfterYield:
    @hookimpl(wrapper=True)
    def on_step_end(self, step):
        yield
        raise RuntimeError("after the yield")


class NeverYields:
    @hookimpl(hookwrapper=True)
    def on_step_end(self, step):
        if False:
            yield


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        (RaisesBeforeYield, ["RuntimeError: before the yield"] * 2),
        (RaisesAfterYield, ["RuntimeError: after the yield"] * 2),
        (NeverYields, ["StopIteration: "] * 2),
        (BrokenTracker, ["RuntimeError: tracker offline at before", "RuntimeError: tracker offline at sft"]),
    ],
)
def test_a_raising_wrapper_or_plain_hook_is_isolated_and_the_others_still_run(broken, error):
    seen = []

    class Around:
        @hookimpl(wrapper=True)
        def on_step_end(self, step):
            result = yield
            seen.append(("around", step))
            return result

    class Plain:
        @hookimpl
        def on_step_end(self, step):
            seen.append(("plain", step))

    plugin, state = knowledge_plugin(0.0)
    result = run_protocol(
        PROTOCOL[:2],
        plugins=[plugin, Plain(), broken(), Around()],
        builtins=False,
        state=state,
        config={"on_error": "skip"},
    )
    assert result.summary["status"] == "completed"
    assert seen == [("plain", "before"), ("around", "before"), ("plain", "sft"), ("around", "sft")]
    errors = [(e["plugin"], e["hook"], e["error"]) for e in result.events if e["kind"] == "hook_error"]
    assert errors == [(broken.__name__, "on_step_end", message) for message in error]


def logging_objective(losses=(1.0, 0.5, 0.25)):
    """An objective that logs as a trainer does, once per optimizer step, through the stub policy."""

    def train(policy, topic):
        for n, loss in enumerate(losses, 1):
            policy.log("sft", {"loss": loss, "step": float(n), "max_steps": float(len(losses))})

    return StubPlugin(objectives={"sft": StubObjective(effect=train)})


class LossTracker:
    def __init__(self):
        self.points = []

    @hookimpl
    def on_trainer_log(self, topic, step, logs):
        self.points.append((topic.name, step, logs["step"], logs["loss"]))


def test_on_trainer_log_hears_every_log_of_a_training_step_as_metrics_jsonl_records_it():
    tracker = LossTracker()
    result = run_protocol(
        [{"name": "sft", "train": "sft"}], plugins=[logging_objective(), tracker], builtins=False
    )
    assert tracker.points == [
        ("topic", "sft", 1.0, 1.0),
        ("topic", "sft", 2.0, 0.5),
        ("topic", "sft", 3.0, 0.25),
    ]
    logged = [
        (e["step"], e["metrics"]["step"], e["metrics"]["loss"]) for e in result.events if e["kind"] == "log"
    ]
    assert logged == [(s, n, loss) for _, s, n, loss in tracker.points]


class OfflineTracker:
    def __init__(self):
        self.calls = 0

    @hookimpl
    def on_trainer_log(self, logs):
        self.calls += 1
        raise ConnectionError("tracker offline")


def test_a_raising_on_trainer_log_never_fails_the_training_step_and_stops_the_run_after_it(tmp_path):
    offline, tracker, recorder = OfflineTracker(), LossTracker(), Recorder()
    protocol = [{"name": "sft", "train": "sft"}, {"name": "later", "train": "sft"}]
    with pytest.raises(RunStopped) as stopped:
        run_protocol(
            protocol,
            plugins=[logging_objective(), offline, tracker, recorder],
            builtins=False,
            output=tmp_path / "run",
        )
    assert str(stopped.value).startswith(
        "plugin 'OfflineTracker' raised in on_trainer_log (topic 'topic', step 'sft'): "
        "ConnectionError: tracker offline; results so far are kept: fix the plugin, or disable it with "
        "ALIGN_DISABLE_PLUGINS=OfflineTracker, and `align run --resume"
    )
    assert offline.calls == 1  # not called again during the step: one failure, one record
    assert len(tracker.points) == 3  # the other plugins heard every log
    assert ("step_end", "topic", "sft", "ran") in recorder.calls  # the step itself succeeded
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["plugin"], e["hook"]) for e in events if e["kind"] == "hook_error"] == [
        ("OfflineTracker", "on_trainer_log")
    ]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["next"] == "topic 'topic', step 'later'"  # the step it watched is saved, not redone


def test_with_on_error_skip_a_raising_on_trainer_log_is_a_warning_once_per_step():
    offline = OfflineTracker()
    protocol = [{"name": "sft", "train": "sft"}, {"name": "later", "train": "sft"}]
    result = run_protocol(
        protocol, plugins=[logging_objective(), offline], builtins=False, config={"on_error": "skip"}
    )
    assert result.summary["status"] == "completed"
    assert offline.calls == 2  # muted for the rest of each step, tried again in the next
    assert [s["status"] for s in result.summary["topics"][0]["steps"]] == ["ran", "ran"]


TRACKER_PLUGIN = """
from align import hookimpl

POINTS = []


@hookimpl
def on_trainer_log(topic, step, logs):
    POINTS.append((topic.name, step, dict(logs)))
"""


def test_on_trainer_log_gets_the_loss_curve_of_a_real_training_run(site, tmp_path, tiny_model_dir):
    import sys

    import yaml
    from click.testing import CliRunner

    from align.cli import cli
    from tests.conftest import make_distribution, write_topic

    make_distribution(site, "align_tracker", TRACKER_PLUGIN)
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "alpha")
    config = tmp_path / "tiny.yaml"
    protocol = [{"name": "sft", "train": "sft"}]
    config.write_text(yaml.safe_dump({"sft": {"epochs": 2, "cloze": 0}, "protocol": protocol}))
    out = tmp_path / "run"
    args = ["run", str(config), "--model", str(tiny_model_dir), "--topics", str(topics), "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    points = sys.modules["align_tracker"].POINTS
    assert [(topic, step) for topic, step, _ in points] == [("alpha", "sft")] * len(points)
    assert [logs["step"] for _, _, logs in points] == [float(n) for n in range(1, len(points) + 1)]
    assert len(points) == points[-1][2]["max_steps"] >= 2
    assert all(isinstance(logs["loss"], float) and logs["loss"] > 0 for _, _, logs in points)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["metrics"] for e in events if e["kind"] == "log"] == [logs for _, _, logs in points]
