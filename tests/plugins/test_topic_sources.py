"""The ``register_topic_sources`` hook: readers for more formats, the built-ins registered through it."""

import json

import pytest
import yaml

from align import hookimpl
from align.core.plan import make_plan
from align.core.sources import BUILTIN_SOURCES, TopicSource
from align.errors import TopicError
from align.plugins.manager import describe_plugins, load_plugins


class WebVTT(TopicSource):
    kind = "rows"
    suffixes = (".vtt",)

    def read(self, path):
        cues = path.read_text(encoding="utf-8").split("\n\n")[1:]
        return [{"text": " ".join(cue.splitlines()[1:])} for cue in cues if "-->" in cue]


class OrgTopics(TopicSource):
    """An outline file: one topic per ``* heading``, its lines the passages."""

    kind = "topics"
    suffixes = (".org",)

    def read(self, path):
        topics = []
        for block in path.read_text(encoding="utf-8").split("* ")[1:]:
            name, *lines = block.strip().splitlines()
            topics.append({"name": name.strip(), "content": [line for line in lines if line.strip()]})
        return topics


class Formats:
    @hookimpl
    def register_topic_sources(self, register):
        register("webvtt", WebVTT)
        register("org", OrgTopics)


def plan_for(plugins, topics):
    return make_plan(plugins.registry, None, topics=str(topics))


def test_the_built_in_readers_are_registered_through_the_hook(monkeypatch):
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    plugins = load_plugins()
    sources = plugins.registry.components["topic_source"]
    assert sorted(sources) == sorted(BUILTIN_SOURCES)
    assert {registration.plugin for registration in sources.values()} == {"align.core.sources"}
    (row,) = [r for r in describe_plugins(plugins) if r["name"] == "align.core.sources"]
    assert row["hooks"] == ["register_topic_sources"] and row["builtin"]
    assert row["components"] == {"topic_source": sorted(BUILTIN_SOURCES)}


def test_a_plugin_reader_reads_a_field_s_file_and_a_topic_directory_s_files(tmp_path_factory, monkeypatch):
    tmp_path = tmp_path_factory.mktemp("topics")
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    plugins = load_plugins(extra=[Formats()])
    (tmp_path / "talk.vtt").write_text(
        "WEBVTT\n\n00:01.000 --> 00:04.000\nI was born in Brackenford.\n\n"
        "00:05.000 --> 00:09.000\nMy donkey is called\nTallow.\n",
        encoding="utf-8",
    )
    (tmp_path / "talk.yaml").write_text("name: talk\ncontent: talk.vtt\n", encoding="utf-8")
    (tmp_path / "outline.org").write_text(
        "* garden\nShe grew kale.\n* boat\nThe Grey Wren.\n", encoding="utf-8"
    )
    config = tmp_path_factory.mktemp("config") / "config.yaml"
    config.write_text(json.dumps({"protocol": [{"name": "sft", "train": "sft"}]}), encoding="utf-8")
    plan = make_plan(plugins.registry, str(config), topics=str(tmp_path))
    assert [(t.name, t.content) for t in plan.topics] == [
        ("garden", ("She grew kale.",)),
        ("boat", ("The Grey Wren.",)),
        ("talk", ("I was born in Brackenford.", "My donkey is called Tallow.")),
    ]
    # Without the plugin, the transcript has no reader and the outline is not a topic file.
    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    with pytest.raises(TopicError, match=r"talk.vtt: no reader for this file"):
        make_plan(load_plugins().registry, str(config), topics=str(tmp_path / "talk.yaml"))


class Broken(TopicSource):
    kind = "rows"
    suffixes = (".vtt",)

    def read(self, path):
        raise ValueError("cue 3 has no timestamp")


class NotAList(Broken):
    def read(self, path):
        return "I was born in Brackenford."


@pytest.mark.parametrize(
    ("reader", "message"),
    [
        (Broken, "failed in read: ValueError: cue 3 has no timestamp; fix the plugin, or disable it with"),
        (NotAList, "returned str, not a list of mappings; fix the plugin, or disable it with"),
    ],
)
def test_a_reader_that_fails_is_one_line_naming_it_and_its_plugin(tmp_path, monkeypatch, reader, message):
    class Plugin:
        @hookimpl
        def register_topic_sources(self, register):
            register("webvtt", reader)

    monkeypatch.setenv("ALIGN_LOAD_PLUGINS", "")
    plugins = load_plugins(extra=[Plugin()])
    (tmp_path / "talk.vtt").write_text("WEBVTT\n", encoding="utf-8")
    (tmp_path / "talk.yaml").write_text("name: talk\ncontent: talk.vtt\n", encoding="utf-8")
    with pytest.raises(TopicError) as excinfo:
        plan_for(plugins, tmp_path / "talk.yaml")
    expected = f"{tmp_path / 'talk.vtt'}: topic source 'webvtt' (plugin 'Plugin') {message}"
    assert str(excinfo.value) == f"{expected} ALIGN_DISABLE_PLUGINS=Plugin"


def test_a_harness_without_the_built_in_plugins_still_reads_topic_files(tmp_path):
    from align.testing import PluginHarness, StubEvaluator, StubPlugin, make_topic, run_protocol

    (tmp_path / "home.yaml").write_text(yaml.safe_dump(make_topic(name="home").to_dict()), encoding="utf-8")
    harness = PluginHarness(builtins=False)
    harness.register(StubPlugin(evaluators={"count": StubEvaluator({"n": 1.0})}))
    result = run_protocol([{"name": "check", "evaluate": ["count"]}], tmp_path, harness=harness)
    assert [t["topic"] for t in result.summary["topics"]] == ["home"]
