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
    assert result.metrics("topic", "before") == {"quiz.accuracy": 0.0}
    assert result.metrics("topic", "study") == {"study.loss": 0.5}
    assert result.metrics("topic", "after") == {"quiz.accuracy": 1.0}
    assert (result.path / "config.yaml").exists() and (result.path / "summary.json").exists()


def test_harness_given_plugins_at_construction():
    harness = PluginHarness(builtins=["threshold"], plugins=[StubPlugin(objectives={"x": StubObjective()})])
    assert harness.registry.names("objective") == ["x"]
    assert harness.registry.names("gate") == ["threshold"]
