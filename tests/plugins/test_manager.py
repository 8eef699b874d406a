import json

import pytest

from align import hookimpl
from align.errors import PluginError
from align.plugins.manager import DEFAULT_PLUGINS, describe_plugins, load_plugins
from tests.conftest import make_distribution


def test_builtins_are_registered_through_the_hooks(plugins):
    registry = plugins.registry
    assert registry.names("objective") == ["dpo", "kto", "sft"]
    assert registry.names("evaluator") == ["quiz", "style", "voice"]
    assert registry.names("gate") == ["threshold"]
    assert registry.get("evaluator", "quiz").plugin == "align.evaluators.quiz"
    registered = {name for name, _ in plugins.manager.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= registered


def test_two_plugins_registering_one_name_names_both(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")

    class MyQuiz:
        @hookimpl
        def register_evaluators(self, register):
            register("quiz", dict)

    with pytest.raises(PluginError) as excinfo:
        load_plugins(extra=[MyQuiz()])
    assert "evaluator 'quiz' is registered by two plugins" in str(excinfo.value)
    assert "'align.evaluators.quiz'" in str(excinfo.value)
    assert "MyQuiz" in str(excinfo.value) or "_" in str(excinfo.value)


def test_a_misspelt_hook_is_an_error_naming_the_plugin(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")

    class Typo:
        @hookimpl
        def register_evaluator(self, register):  # missing the final "s"
            pass

    with pytest.raises(PluginError, match="register_evaluator"):
        load_plugins(extra=[Typo()])


BROKEN = "raise ImportError('needs a library that is not installed')\n"
LENGTH = """
    from align import hookimpl

    class LengthEvaluator:
        metrics = ("mean_chars",)

        def evaluate(self, model, topic):
            answers = model.generate([p.prompt for p in topic.voice_pairs])
            return {"mean_chars": sum(map(len, answers)) / len(answers)}

    @hookimpl
    def register_evaluators(register):
        register("length", LengthEvaluator)
"""


def test_a_broken_entry_point_is_recorded_not_raised(site):
    make_distribution(site, "align_broken", BROKEN)
    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    assert [f.name for f in plugins.failures] == ["align_broken"]
    failure = plugins.failures[0]
    assert (failure.distribution, failure.version) == ("align-broken", "1.2.3")
    assert "needs a library that is not installed" in failure.error
    assert plugins.registry.get("evaluator", "length").plugin == "align_length"
    rows = {row["name"]: row for row in describe_plugins(plugins)}
    assert rows["align_broken"]["error"].startswith("ImportError")
    assert rows["align_length"] == {
        "name": "align_length",
        "distribution": "align-length",
        "version": "1.2.3",
        "builtin": False,
        "hooks": ["register_evaluators"],
        "components": {"evaluator": ["length"]},
        "error": None,
    }
    json.dumps(rows)  # what `align plugins` prints must be JSON


def test_load_and_disable_lists(site, monkeypatch):
    make_distribution(site, "align_length", LENGTH)
    monkeypatch.setenv("ALIGN_DISABLE_PLUGINS", "align_length")
    assert load_plugins().registry.get("evaluator", "length") is None
    monkeypatch.delenv("ALIGN_DISABLE_PLUGINS")
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    assert load_plugins().registry.get("evaluator", "length") is None
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "align_length")
    assert load_plugins().registry.get("evaluator", "length") is not None


def test_an_entry_point_plugin_is_used_in_a_run(site, tmp_path):
    from align.core.plan import resolve_plan
    from align.core.runner import execute
    from align.testing import StubModel, StubPolicy
    from tests.conftest import write_topic

    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    topics = tmp_path / "topics"
    topics.mkdir()
    write_topic(topics, "t")
    plan = resolve_plan(
        {"protocol": [{"name": "len", "evaluate": ["length"]}], "output": str(tmp_path / "run")},
        "cfg.yaml",
        plugins.registry,
        topics=topics,
    )
    summary = execute(plan, policy=StubPolicy(StubModel(generate=lambda p: "x" * 7)))
    assert summary["topics"][0]["steps"][0]["metrics"] == {"length.mean_chars": 7.0}


def test_a_plugin_calling_sys_exit_on_import_is_a_recorded_failure_not_an_exit(site):
    make_distribution(site, "align_exits", "import sys\nsys.exit(0)\n")
    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    assert [(f.name, f.error) for f in plugins.failures] == [("align_exits", "SystemExit: 0")]
    assert plugins.registry.get("evaluator", "length") is not None


def test_a_registration_hook_that_exits_is_an_error_naming_the_plugin(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")

    class Exits:
        @hookimpl
        def register_evaluators(self, register):
            raise SystemExit(0)

    with pytest.raises(
        PluginError, match=r"^plugin 'Exits' raised in register_evaluators: SystemExit: 0; fix"
    ):
        load_plugins(extra=[Exits()])
