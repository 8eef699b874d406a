"""align.testing's plugin harness, as plugin authors use it through the pytest fixtures."""

import pytest

from align import hookimpl
from align.errors import PluginError
from align.testing import PluginHarness, StubObjective, StubPlugin, make_topic, run_protocol


def test_plugin_manager_fixture_is_isolated(plugin_manager):
    assert plugin_manager.registry.names("evaluator") == []
    plugin_manager.add_builtins(["quiz"])
    assert plugin_manager.registry.names("evaluator") == ["quiz"]
    plugin_manager.add_builtins(["threshold"])
    assert plugin_manager.registry.names("gate") == ["threshold"]


def test_unknown_builtin_names_the_ones_there_are(plugin_manager):
    with pytest.raises(PluginError, match="no built-in plugin named quizz"):
        plugin_manager.add_builtins(["quizz"])


def test_a_misspelt_hook_fails_when_the_registry_is_built(plugin_manager):
    class Typo:
        @hookimpl
        def register_gate(self, register):
            pass

    plugin_manager.register(Typo())
    with pytest.raises(PluginError, match=r"plugin 'Typo'.*register_gate"):
        plugin_manager.registry  # noqa: B018


def test_plugins_are_named_after_their_class_and_numbered(plugin_manager):
    plugin_manager.register(StubPlugin())
    plugin_manager.register(StubPlugin())
    names = {name for name, _ in plugin_manager.manager.list_name_plugin()}
    assert {"StubPlugin", "StubPlugin-2"} <= names


def test_run_protocol_with_builtin_evaluators_and_a_stub_objective(stub_model):
    # The real quiz evaluator scores the stub model inside the engine's loop.
    topic = make_topic(
        quiz=[{"question": "Q?", "choices": ["right", "wrong"], "answer": 0}],
    )
    learned = {"yes": False}

    def learn(policy, topic):
        learned["yes"] = True

    model = stub_model(loglikelihood=lambda p, c: 1.0 if (c == "right") == learned["yes"] else 0.0)
    result = run_protocol(
        [
            {"name": "before", "evaluate": ["quiz"]},
            {"name": "study", "train": "study"},
            {"name": "after", "evaluate": ["quiz"]},
        ],
        [topic],
        plugins=[StubPlugin(objectives={"study": StubObjective(effect=learn, metrics={"loss": 0.5})})],
        builtins=["quiz"],
        model=model,
    )
    # the margin is per character: (0 - 1) / 5 before learning, (1 - 0) / 5 after
    assert result.metrics("topic", "before") == {"quiz.accuracy": 0.0, "quiz.margin": pytest.approx(-0.2)}
    assert result.metrics("topic", "study") == {"study.loss": 0.5}
    assert result.metrics("topic", "after") == {"quiz.accuracy": 1.0, "quiz.margin": pytest.approx(0.2)}
    assert (result.path / "config.yaml").exists() and (result.path / "summary.json").exists()


def test_harness_given_plugins_at_construction():
    harness = PluginHarness(builtins=["threshold"], plugins=[StubPlugin(objectives={"x": StubObjective()})])
    assert harness.registry.names("objective") == ["x"]
    assert harness.registry.names("gate") == ["threshold"]


#: One evaluation step with a stub evaluator: a run in milliseconds that still writes a run directory.
PROBE = [{"name": "check", "evaluate": ["probe"]}]


def probe_plugin():
    from align.testing import StubEvaluator

    return StubPlugin(evaluators={"probe": StubEvaluator({"score": 0.5})})


def test_a_temporary_run_directory_goes_when_the_result_is_used_as_a_context():
    with run_protocol(PROBE, plugins=[probe_plugin()], builtins=False) as result:
        assert (result.path / "summary.json").is_file()
        assert result.path.parent.name.startswith("align-run-")
    assert not result.path.parent.exists()


def test_remove_temporary_runs_removes_every_run_made_without_output():
    from align.testing import remove_temporary_runs

    paths = [run_protocol(PROBE, plugins=[probe_plugin()], builtins=False).path for _ in range(2)]
    assert all(path.is_dir() for path in paths)
    remove_temporary_runs()
    assert not any(path.parent.exists() for path in paths)


def test_a_run_given_output_is_left_where_it_is(tmp_path):
    from align.testing import remove_temporary_runs

    with run_protocol(PROBE, plugins=[probe_plugin()], builtins=False, output=tmp_path / "run") as result:
        pass
    remove_temporary_runs()
    assert result.path == tmp_path / "run"
    assert (tmp_path / "run" / "summary.json").is_file()


def test_no_temporary_run_directory_is_left_behind_when_the_process_ends():
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO

    script = (
        "from align.testing import StubEvaluator, StubPlugin, run_protocol\n"
        "plugin = StubPlugin(evaluators={'probe': StubEvaluator({'score': 0.5})})\n"
        f"result = run_protocol({PROBE!r}, plugins=[plugin], builtins=False)\n"
        "assert (result.path / 'summary.json').is_file()\n"
        "print(result.path)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert child.returncode == 0, child.stderr
    path = Path(child.stdout.strip().splitlines()[-1])
    assert path.name == "run" and path.parent.name.startswith("align-run-")
    assert not path.parent.exists(), f"{path.parent}: left behind"
