"""The engine with stub objectives, evaluators and a stub policy: no torch model, milliseconds."""

import json
import re
from dataclasses import dataclass

import pytest

from align.core.plan import resolve_plan
from align.core.runner import execute
from align.errors import RunStopped
from align.plugins.manager import load_plugins
from align.testing import StubPlugin, StubPolicy
from tests.conftest import write_topic


@dataclass
class CountingObjective:
    gain: float = 0.25
    metrics = ("loss", "steps")

    def __post_init__(self):
        self.trained = []

    def train(self, policy, topic):
        self.trained.append(topic.name)
        policy.language_model.level = getattr(policy.language_model, "level", 0.0) + self.gain
        return {"loss": 1.0 - self.gain, "steps": 3}


@dataclass
class LevelEvaluator:
    """Reports the stub model's level, which the objective raises."""

    metrics = ("level",)

    def evaluate(self, model, topic):
        return {"level": getattr(model, "level", 0.0)}


PROTOCOL = [
    {"name": "before", "evaluate": ["level"]},
    {"name": "train", "train": "bump"},
    {"name": "after", "evaluate": ["level"]},
    {"name": "extra", "train": "bump", "gate": {"use": "threshold", "all": ["level.level >= 0.5"]}},
    {"name": "final", "evaluate": ["level"], "if_ran": "extra"},
]


@pytest.fixture
def stub_plugins(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    return load_plugins(
        extra=[StubPlugin(objectives={"bump": CountingObjective}, evaluators={"level": LevelEvaluator})]
    )


def run(stub_plugins, tmp_path, protocol=PROTOCOL, topics=("t1", "t2"), **config):
    topic_dir = tmp_path / "topics"
    topic_dir.mkdir(exist_ok=True)
    for name in topics:
        write_topic(topic_dir, name)
    data = {"protocol": protocol, "output": str(tmp_path / "run"), **config}
    plan = resolve_plan(data, "test.yaml", stub_plugins.registry, topics=topic_dir)
    policy = StubPolicy()
    summary = execute(plan, policy=policy)
    return plan, policy, summary


def events(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_steps_run_in_order_with_prefixed_metrics(stub_plugins, tmp_path):
    _plan, _policy, _summary = run(stub_plugins, tmp_path, topics=("t1",))
    seen = [(e["step"], e["kind"]) for e in events(tmp_path)]
    assert seen == [
        ("before", "eval"),
        ("train", "train"),
        ("after", "eval"),
        ("extra", "gate"),
        ("final", "skip"),
    ]
    first = events(tmp_path)[1]
    assert first["topic"] == "t1"
    assert first["metrics"] == {"bump.loss": 0.75, "bump.steps": 3.0}
    assert events(tmp_path)[2]["metrics"] == {"level.level": 0.25}


def test_gate_blocks_then_passes_as_the_metric_grows(stub_plugins, tmp_path):
    # The level carries across topics (one adapter): 0.25 after t1's training blocks the gate,
    # 0.5 after t2's training passes it.
    _, _, summary = run(stub_plugins, tmp_path)
    gates = [e for e in events(tmp_path) if e["kind"] == "gate"]
    assert [(g["topic"], g["passed"]) for g in gates] == [("t1", False), ("t2", True)]
    assert gates[0]["reason"] == "level.level 0.25 < 0.50"
    assert gates[1]["reason"] == "level.level 0.50 >= 0.50"
    t2 = summary["topics"][1]
    assert [s["status"] for s in t2["steps"]] == ["ran"] * 5
    assert t2["steps"][-1]["metrics"] == {"level.level": 0.75}
    t1 = summary["topics"][0]
    assert [s["status"] for s in t1["steps"]][-2:] == ["skipped", "skipped"]
    assert t1["steps"][-1]["gate"]["reason"] == "step 'extra' did not run"


def test_objective_instances_are_built_once_and_see_every_topic(stub_plugins, tmp_path):
    plan, _, _ = run(stub_plugins, tmp_path, topics=("a", "b", "c"))
    assert plan.steps[1].components[0].instance.trained == ["a", "b", "c"]


def test_run_directory_holds_config_summary_and_an_adapter_per_topic(stub_plugins, tmp_path):
    _, policy, summary = run(stub_plugins, tmp_path, seed=7)
    run_dir = tmp_path / "run"
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["seed"] == 7
    assert config["protocol"][3]["gate"] == {"use": "threshold", "all": ["level.level >= 0.5"], "any": []}
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["topics"] == summary["topics"]
    assert [p.name for p in policy.saved] == ["t1", "t2"]
    assert (run_dir / "adapters" / "t2" / "stub_adapter.json").is_file()


def test_a_run_refuses_a_directory_that_holds_a_run(stub_plugins, tmp_path):
    run(stub_plugins, tmp_path)
    from align.errors import AlignError

    with pytest.raises(AlignError, match="already exists and is not empty"):
        run(stub_plugins, tmp_path)


def test_a_failing_objective_leaves_a_summary_of_what_finished(stub_plugins, tmp_path):
    class Boom:
        def train(self, policy, topic):
            if topic.name == "t2":
                raise RuntimeError("boom")
            return {"loss": 0.1}

    plugins = load_plugins(extra=[StubPlugin(objectives={"boom": Boom})], entry_points=False)
    with pytest.raises(
        RunStopped,
        match=r"topic 't2', step 'b': objective 'boom' \(plugin 'StubPlugin'\) failed: RuntimeError: boom",
    ):
        run(plugins, tmp_path, protocol=[{"name": "b", "train": "boom"}])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "RuntimeError: boom" in summary["error"]
    first, cut_short = summary["topics"]
    assert (first["topic"], first.get("complete", True), first["steps"][0]["status"]) == ("t1", True, "ran")
    assert (cut_short["topic"], cut_short["complete"]) == ("t2", False)
    assert cut_short["steps"][0]["status"] == "failed"
    assert cut_short["steps"][0]["error"]["plugin"] == "StubPlugin"


def test_an_evaluator_returning_a_non_number_is_reported(stub_plugins, tmp_path):
    class Bad:
        def evaluate(self, model, topic):
            return {"x": "high"}

    plugins = load_plugins(extra=[StubPlugin(evaluators={"bad": Bad})], entry_points=False)
    with pytest.raises(RunStopped, match="evaluator 'bad' returned x='high'"):
        run(plugins, tmp_path, protocol=[{"evaluate": ["bad"]}])


def strict_json(text):
    """``json.loads`` as strict parsers read: a bare NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_evaluator_returning_a_non_finite_number_fails_its_step_and_no_invalid_json_is_written(
    tmp_path, value
):
    class NonFinite:
        def evaluate(self, model, topic):
            return {"score": value, "fine": 0.5}

    protocol = [{"name": "check", "evaluate": ["odd"]}, {"name": "train", "train": "bump"}]
    stub = StubPlugin(objectives={"bump": CountingObjective}, evaluators={"odd": NonFinite})
    plugins = load_plugins(extra=[stub], entry_points=False)
    _, _, summary = run(plugins, tmp_path, protocol=protocol, on_error="skip")
    step = summary["topics"][0]["steps"][0]
    assert step["status"] == "failed" and step["metrics"] == {}
    assert step["error"]["plugin"] == "StubPlugin"
    assert (
        f"evaluator 'odd' returned score={value}; metric values must be finite numbers"
        in step["error"]["reason"]
    )
    run_dir = tmp_path / "run"
    strict_json((run_dir / "summary.json").read_text())
    strict_json((run_dir / "checkpoint" / "state.json").read_text())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    (tmp_path / "stop").mkdir()
    with pytest.raises(
        RunStopped,
        match=r"evaluator 'odd' \(plugin 'StubPlugin'\) failed: ValueError: evaluator 'odd' returned score=",
    ):
        run(plugins, tmp_path / "stop", protocol=protocol)


def test_json_writers_refuse_non_finite_numbers_rather_than_write_invalid_json(tmp_path):
    from align.core.rundir import RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.create("seed: 0\n")
    try:
        with pytest.raises(ValueError, match="not JSON compliant"):
            rundir.record({"metrics": {"x": float("nan")}})
        with pytest.raises(ValueError, match="not JSON compliant"):
            rundir.write_summary({"seconds": float("inf")})
    finally:
        rundir.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "run" / "summary.json").exists()


class Exits:
    """A plugin component that calls ``sys.exit(0)``: it used to end ``align run`` with exit 0."""

    def __init__(self, **params):
        if params.get("at") == "build":
            raise SystemExit(0)

    def evaluate(self, model, topic):
        raise SystemExit(0)

    def train(self, policy, topic):
        raise SystemExit(0)


@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        (
            [{"name": "check", "evaluate": ["exits"]}],
            "step 'check': evaluator 'exits' (plugin 'StubPlugin') failed: SystemExit: 0",
        ),
        (
            [{"name": "learn", "train": "exits"}],
            "step 'learn': objective 'exits' (plugin 'StubPlugin') failed: SystemExit: 0",
        ),
    ],
)
def test_a_plugin_raising_system_exit_fails_its_step(tmp_path, protocol, message):
    plugins = load_plugins(
        extra=[StubPlugin(objectives={"exits": Exits}, evaluators={"exits": Exits})], entry_points=False
    )
    with pytest.raises(RunStopped, match=re.escape(message)):
        run(plugins, tmp_path, protocol=protocol)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"


def test_a_plugin_raising_system_exit_in_a_recheck_or_a_hook_is_reported(tmp_path):
    from align import hookimpl

    class ExitingHook:
        @hookimpl
        def on_topic_end(self, topic, result):
            raise SystemExit(3)

    class ExitsInRecheck:
        def evaluate(self, model, topic):
            if topic.name == "t1" and getattr(model, "level", 0.0) > 0.25:  # after t2's training
                raise SystemExit(0)
            return {"level": getattr(model, "level", 0.0)}

    stub = StubPlugin(objectives={"bump": CountingObjective}, evaluators={"odd": ExitsInRecheck})
    plugins = load_plugins(extra=[stub, ExitingHook()], entry_points=False)
    protocol = [{"name": "train", "train": "bump"}, {"name": "check", "evaluate": ["odd"]}]
    topic_dir = tmp_path / "topics"
    topic_dir.mkdir()
    for name in ("t1", "t2"):
        write_topic(topic_dir, name)
    data = {"protocol": protocol, "output": str(tmp_path / "run"), "on_error": "skip"}
    plan = resolve_plan(data, "test.yaml", plugins.registry, topics=topic_dir)
    summary = execute(plan, policy=StubPolicy(), hooks=plugins.manager)
    assert summary["status"] == "completed"
    kinds = [
        (e["kind"], e.get("exception") or e.get("error"))
        for e in events(tmp_path)
        if e["kind"] in ("error", "hook_error")
    ]
    assert ("hook_error", "SystemExit: 3") in kinds
    assert ("error", "SystemExit") in kinds  # the recheck of t1


def test_a_plugin_raising_system_exit_while_built_is_an_error_naming_it(tmp_path):
    from align.errors import PluginError

    plugins = load_plugins(extra=[StubPlugin(evaluators={"exits": Exits})], entry_points=False)
    protocol = [{"name": "check", "evaluate": [{"use": "exits", "at": "build"}]}]
    with pytest.raises(
        PluginError, match=r"plugin 'StubPlugin' raised SystemExit: 0 while building evaluator 'exits'"
    ):
        run(plugins, tmp_path, protocol=protocol)


def test_an_evaluator_returning_more_metrics_than_the_bound_fails_its_own_step(tmp_path):
    from align.core.engine import MAX_METRICS

    class Many:
        def __init__(self):
            self.count = MAX_METRICS + 1

        def evaluate(self, model, topic):
            return {f"m{i}": 0.5 for i in range(self.count)}

    many = Many()
    protocol = [{"name": "check", "evaluate": ["many"]}, {"name": "train", "train": "bump"}]
    stub = StubPlugin(objectives={"bump": CountingObjective}, evaluators={"many": many})
    plugins = load_plugins(extra=[stub], entry_points=False)
    _, _, summary = run(plugins, tmp_path, protocol=protocol, on_error="skip")
    check, train = summary["topics"][0]["steps"]
    assert check["status"] == "failed" and check["metrics"] == {}
    assert check["error"]["reason"] == (
        f"evaluator 'many' (plugin 'StubPlugin') failed: ValueError: evaluator 'many' returned "
        f"{MAX_METRICS + 1} metrics; at most {MAX_METRICS} per call"
    )
    assert train["status"] == "ran"
    many.count = MAX_METRICS  # the bound itself is allowed
    (tmp_path / "at-bound").mkdir()
    _, _, summary = run(plugins, tmp_path / "at-bound", protocol=protocol, on_error="skip")
    assert len(summary["topics"][0]["steps"][0]["metrics"]) == MAX_METRICS


def test_the_forgetting_matrix_lists_each_metric_once_in_order_of_first_appearance(tmp_path):
    class Changing:
        def evaluate(self, model, topic):
            return {"b": 1.0, "a": 0.5} if topic.name == "t1" else {"c": 0.25, "a": 0.75}

    protocol = [{"name": "check", "evaluate": ["changing"]}]
    plugins = load_plugins(extra=[StubPlugin(evaluators={"changing": Changing})], entry_points=False)
    _, _, summary = run(plugins, tmp_path, protocol=protocol)
    assert list(summary["forgetting"]["metrics"]) == ["changing.b", "changing.a", "changing.c"]


def _append_to_quiz(topic):
    topic.quiz.append(topic.quiz[0])


def _replace_a_passage(topic):
    topic.content[0] = "Ilse sold the donkey."


def _set_an_attribute(topic):
    topic.content = ("Ilse sold the donkey.",)


def _set_a_quiz_answer(topic):
    topic.quiz[0].answer = 1


@pytest.mark.parametrize(
    "mutate, exception",
    [
        (_append_to_quiz, "AttributeError"),
        (_replace_a_passage, "TypeError"),
        (_set_an_attribute, "FrozenInstanceError"),
        (_set_a_quiz_answer, "FrozenInstanceError"),
    ],
)
def test_a_plugin_that_mutates_its_topic_fails_its_own_step_and_later_steps_see_the_original(
    tmp_path, mutate, exception
):
    seen = []

    class Mutating:
        def evaluate(self, model, topic):
            mutate(topic)
            return {"score": 1.0}

    class Watching:
        def train(self, policy, topic):
            seen.append((topic.content, [(q.question, q.choices, q.answer) for q in topic.quiz]))
            return {"loss": 0.5}

    protocol = [{"name": "meddle", "evaluate": ["meddler"]}, {"name": "train", "train": "watch"}]
    stub = StubPlugin(objectives={"watch": Watching}, evaluators={"meddler": Mutating})
    plugins = load_plugins(extra=[stub], entry_points=False)
    _, _, summary = run(plugins, tmp_path, protocol=protocol, topics=("t1",), on_error="skip")
    meddle, train = summary["topics"][0]["steps"]
    assert meddle["status"] == "failed"
    assert meddle["error"]["component"] == "meddler" and meddle["error"]["exception"] == exception
    assert meddle["error"]["reason"].startswith(
        f"evaluator 'meddler' (plugin 'StubPlugin') failed: {exception}"
    )
    assert train["status"] == "ran" and "error" not in train
    from align import load_topics

    original = load_topics(tmp_path / "topics")[0]
    assert seen == [(original.content, [(q.question, q.choices, q.answer) for q in original.quiz])]


def test_an_evaluator_past_evaluate_timeout_fails_its_step_and_stops_the_run_even_with_skip(tmp_path):
    import threading

    release = threading.Event()

    class Hanging:
        def evaluate(self, model, topic):
            release.wait(60)  # a hang the test can end, so no thread outlives it
            return {"score": 1.0}

    protocol = [{"name": "check", "evaluate": ["hang"]}, {"name": "train", "train": "bump"}]
    stub = StubPlugin(objectives={"bump": CountingObjective}, evaluators={"hang": Hanging})
    plugins = load_plugins(extra=[stub], entry_points=False)
    try:
        with pytest.raises(RunStopped) as stopped:
            run(plugins, tmp_path, protocol=protocol, topics=("t1",), on_error="skip", evaluate_timeout=0.2)
    finally:
        release.set()
    run_dir = tmp_path / "run"
    assert str(stopped.value) == (
        "topic 't1', step 'check': evaluator 'hang' (plugin 'StubPlugin') failed: EvaluateTimeout: did "
        "not return within 0.2s (evaluate_timeout); the run stops even with on_error: skip, as the "
        "evaluator still runs and holds the model; results so far are kept: fix the evaluator or raise "
        f"evaluate_timeout in {run_dir / 'config.yaml'}, and `align run --resume {run_dir}`"
    )
    (step,) = json.loads((run_dir / "summary.json").read_text())["topics"][0]["steps"]
    assert step["status"] == "failed" and step["error"]["exception"] == "EvaluateTimeout"
    assert [e["kind"] for e in events(tmp_path) if e["step"] == "train"] == []  # nothing ran after it


def test_under_evaluate_timeout_an_evaluator_returns_and_raises_as_without_one(tmp_path):
    class Fine:
        def evaluate(self, model, topic):
            return {"score": 0.75}

    class Exiting:
        def evaluate(self, model, topic):
            raise SystemExit(3)  # raised in the evaluator's thread, recorded as its step's failure

    protocol = [{"name": "check", "evaluate": ["fine"]}, {"name": "exit", "evaluate": ["exiting"]}]
    stub = StubPlugin(evaluators={"fine": Fine, "exiting": Exiting})
    plugins = load_plugins(extra=[stub], entry_points=False)
    _, _, summary = run(plugins, tmp_path, protocol=protocol, on_error="skip", evaluate_timeout="5")
    check, exiting = summary["topics"][0]["steps"]
    assert check["status"] == "ran" and check["metrics"] == {"fine.score": 0.75}
    assert exiting["status"] == "failed" and exiting["error"]["exception"] == "SystemExit"
    assert summary["topics"][1]["steps"][0]["status"] == "ran"  # skip: the run went on


def test_a_recheck_past_evaluate_timeout_stops_the_run(tmp_path):
    import threading

    release = threading.Event()

    class SlowOnRecheck:
        calls = 0

        def evaluate(self, model, topic):
            SlowOnRecheck.calls += 1
            if SlowOnRecheck.calls == 3:  # t1, t2, then t1's recheck after t2
                release.wait(60)
            return {"score": 1.0}

    protocol = [{"name": "check", "evaluate": ["slow"]}]
    plugins = load_plugins(extra=[StubPlugin(evaluators={"slow": SlowOnRecheck})], entry_points=False)
    try:
        with pytest.raises(
            RunStopped, match=r"^topic 't2', recheck of 't1': evaluator 'slow' .*EvaluateTimeout"
        ):
            run(plugins, tmp_path, protocol=protocol, on_error="skip", evaluate_timeout=0.2)
    finally:
        release.set()


def test_what_is_loaded_before_the_run_is_kept_out_of_full_collections(monkeypatch, tmp_path):
    """Objects alive when the run starts are frozen for it (the trainers' full collections skip
    them), and thawed when it ends, also after a failure."""
    import gc

    seen = []

    @dataclass
    class Watching(CountingObjective):
        def train(self, policy, topic):
            seen.append(gc.get_freeze_count())
            return super().train(policy, topic)

    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    plugins = load_plugins(
        extra=[StubPlugin(objectives={"bump": Watching}, evaluators={"level": LevelEvaluator})]
    )
    assert gc.get_freeze_count() == 0
    run(plugins, tmp_path, topics=("t1",))
    assert seen and all(count > 1000 for count in seen)
    assert gc.get_freeze_count() == 0

    @dataclass
    class Failing(CountingObjective):
        def train(self, policy, topic):
            raise RuntimeError("boom")

    plugins = load_plugins(
        extra=[StubPlugin(objectives={"bump": Failing}, evaluators={"level": LevelEvaluator})]
    )
    (tmp_path / "again").mkdir()
    with pytest.raises(RunStopped, match="boom"):
        run(plugins, tmp_path / "again", topics=("t1",))
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_as_it_was(stub_plugins, tmp_path):
    import gc

    gc.freeze()
    try:
        assert gc.get_freeze_count() > 1000
        run(stub_plugins, tmp_path, topics=("t1",))
        # still frozen (a few of the frozen objects may have been freed meanwhile)
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_garbage_left_before_the_run_is_freed_not_frozen(stub_plugins, tmp_path):
    import gc
    import weakref

    class Node:
        pass

    gc.disable()  # only the run's own pass may free the cycle
    try:
        node = Node()
        node.me = node
        alive = weakref.ref(node)
        del node
        assert alive() is not None  # a cycle: reference counting alone never frees it
        run(stub_plugins, tmp_path, topics=("t1",))
        assert alive() is None
    finally:
        gc.enable()
