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


MY_QUIZ = """
    from align import hookimpl

    class MyQuiz:
        def evaluate(self, model, topic):
            return {"accuracy": 1.0}

    @hookimpl
    def register_evaluators(register):
        register("quiz", MyQuiz)
"""


def test_a_plugin_may_shadow_a_built_in_with_a_warning_whose_fix_works(site, monkeypatch):
    make_distribution(site, "align_my_quiz", MY_QUIZ)
    plugins = load_plugins()
    assert plugins.failures == []
    assert plugins.registry.get("evaluator", "quiz").plugin == "align_my_quiz"
    assert plugins.registry.get("evaluator", "voice").plugin == "align.evaluators.voice"
    assert plugins.warnings == [
        "plugin 'align_my_quiz' replaces the built-in evaluator 'quiz' of 'align.evaluators.quiz'; "
        "to use the built-in, disable it with ALIGN_DISABLE_PLUGINS=align_my_quiz"
    ]
    rows = {row["name"]: row for row in describe_plugins(plugins)}
    assert rows["align_my_quiz"]["components"] == {"evaluator": ["quiz"]}
    assert rows["align.evaluators.quiz"]["components"] == {}  # the built-in's quiz is not the one in use

    monkeypatch.setenv("ALIGN_DISABLE_PLUGINS", "align_my_quiz")  # the fix the warning gives
    plugins = load_plugins()
    assert plugins.registry.get("evaluator", "quiz").plugin == "align.evaluators.quiz"
    assert plugins.warnings == []


def test_two_third_party_plugins_on_one_name_fail_the_second_only(site, monkeypatch):
    make_distribution(site, "align_a_quiz", MY_QUIZ)
    make_distribution(site, "align_b_quiz", MY_QUIZ)
    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    assert plugins.registry.get("evaluator", "quiz").plugin == "align_a_quiz"
    assert plugins.registry.get("evaluator", "length").plugin == "align_length"
    [failure] = plugins.failures
    assert (failure.name, failure.distribution, failure.version) == ("align_b_quiz", "align-b-quiz", "1.2.3")
    assert failure.error == (
        "registered evaluator 'quiz', which plugin 'align_a_quiz' registered already; "
        "uninstall one of the two, or disable it with ALIGN_DISABLE_PLUGINS=align_b_quiz"
    )
    assert "align_b_quiz" not in {name for name, _ in plugins.manager.list_name_plugin()}

    monkeypatch.setenv("ALIGN_DISABLE_PLUGINS", "align_b_quiz")
    assert load_plugins().failures == []


@pytest.mark.parametrize("reserved", ["model", "lora", "seed", "protocol", "replay"])
def test_a_component_named_like_a_base_config_section_is_refused(plugins, reserved):
    class Taken:
        @hookimpl
        def register_objectives(self, register):
            register("fine", dict)

        @hookimpl
        def register_evaluators(self, register):
            register(reserved, dict)

    loaded = load_plugins(extra=[Taken()], entry_points=False)
    [failure] = loaded.failures
    assert failure.name == "Taken"
    assert failure.error.startswith(
        f"registered an evaluator named '{reserved}', which is a base section of the config (reserved: "
    )
    assert failure.error.endswith("); register it under another name")
    assert loaded.registry.get("objective", "fine") is None  # a failed plugin contributes nothing
    assert loaded.registry.get("evaluator", reserved) is None
    assert loaded.registry.names("evaluator") == ["quiz", "style", "voice"]


def test_a_misspelt_hook_is_a_load_failure_naming_the_plugin_and_the_hook(plugins):
    class Typo:
        @hookimpl
        def register_evaluator(self, register):  # missing the final "s"
            register("typo", dict)

    loaded = load_plugins(extra=[Typo()], entry_points=False)
    assert [(f.name, f.error) for f in loaded.failures] == [
        (
            "Typo",
            "implements 'register_evaluator', which is not an align hook; did you mean "
            "'register_evaluators'? (docs/plugins.md lists the hooks)",
        )
    ]
    assert not loaded.manager.has_plugin("Typo")


def test_a_misspelt_hook_in_an_entry_point_is_a_load_failure(site):
    make_distribution(
        site, "align_typo", "from align import hookimpl\n\n@hookimpl\ndef on_step_ends(step):\n    pass\n"
    )
    [failure] = load_plugins().failures
    assert failure.name == "align_typo"
    assert "'on_step_ends', which is not an align hook; did you mean 'on_step_end'?" in failure.error


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


RAISES_IN_REGISTER = """
    from align import hookimpl

    @hookimpl
    def register_objectives(register):
        register("half", dict)

    @hookimpl
    def register_evaluators(register):
        raise ValueError("no licence key")

    @hookimpl
    def on_run_start(plan, output):
        raise AssertionError("a plugin that failed to load must not watch the run")
"""


def test_a_raising_registration_hook_is_a_recorded_load_failure(site):
    make_distribution(site, "align_raises", RAISES_IN_REGISTER)
    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    assert [(f.name, f.distribution, f.version, f.error) for f in plugins.failures] == [
        ("align_raises", "align-raises", "1.2.3", "raised in register_evaluators: ValueError: no licence key")
    ]
    assert plugins.registry.get("objective", "half") is None  # what it registered before raising is dropped
    assert plugins.registry.get("evaluator", "length").plugin == "align_length"
    assert not plugins.manager.has_plugin("align_raises")  # so its lifecycle hooks are never called
    rows = {row["name"]: row for row in describe_plugins(plugins)}
    assert rows["align_raises"]["error"] == "raised in register_evaluators: ValueError: no licence key"


def test_a_registration_hook_that_exits_is_a_load_failure_not_an_exit(plugins):
    class Exits:
        @hookimpl
        def register_evaluators(self, register):
            raise SystemExit(0)

    loaded = load_plugins(extra=[Exits()], entry_points=False)
    assert [(f.name, f.error) for f in loaded.failures] == [
        ("Exits", "raised in register_evaluators: SystemExit: 0")
    ]


@pytest.mark.parametrize("style", [{"wrapper": True}, {"hookwrapper": True}])
def test_a_contribution_hook_written_as_a_wrapper_is_refused(plugins, style):
    class Wraps:
        @hookimpl(**style)
        def register_gates(self, register):
            register("never", dict)
            yield

    loaded = load_plugins(extra=[Wraps()], entry_points=False)
    [failure] = loaded.failures
    assert failure.error.startswith("made register_gates a wrapper (wrapper=True or hookwrapper=True)")
    assert loaded.registry.get("gate", "never") is None


def test_the_harness_raises_what_load_plugins_records(plugin_manager):
    class Raises:
        @hookimpl
        def register_evaluators(self, register):
            raise ValueError("boom")

    plugin_manager.register(Raises())
    with pytest.raises(
        PluginError, match=r"^plugin 'Raises' raised in register_evaluators: ValueError: boom$"
    ):
        plugin_manager.registry  # noqa: B018


def test_a_hook_pluggy_refuses_to_register_is_a_one_line_load_failure(plugins):
    class NotAGenerator:
        @hookimpl(wrapper=True)
        def on_run_end(self, summary):
            pass

    loaded = load_plugins(extra=[NotAGenerator()], entry_points=False)
    [failure] = loaded.failures
    assert failure.name == "NotAGenerator"
    assert not loaded.manager.has_plugin("NotAGenerator")  # nothing of it is left registered
    assert failure.error.startswith("PluginValidationError: Plugin 'NotAGenerator' for hook 'on_run_end'; ")
    assert failure.error.endswith(
        "Declared as wrapper=True or hookwrapper=True but function is not a generator function"
    )
    assert "\n" not in failure.error


def test_a_firstresult_hookimpl_is_a_load_failure_of_that_plugin_only(site):
    # firstresult belongs to a hook's spec, not to an implementation: pluggy refuses it at import.
    source = "from align import hookimpl\n\n@hookimpl(firstresult=True)\ndef on_run_end(summary):\n    pass\n"
    make_distribution(site, "align_first", source)
    make_distribution(site, "align_length", LENGTH)
    plugins = load_plugins()
    assert [(f.name, f.error) for f in plugins.failures] == [
        (
            "align_first",
            "TypeError: HookimplMarker.__call__() got an unexpected keyword argument 'firstresult'",
        )
    ]
    assert plugins.registry.get("evaluator", "length") is not None
