import re

import pytest
import yaml

from align import Topic, load_topics
from align.errors import TopicError
from align.testing import make_topic
from tests.conftest import REPO, write_topic


def test_demo_topics_load_in_name_order():
    topics = load_topics(REPO / "align" / "demo" / "topics")
    assert [t.name for t in topics] == ["early_life", "work", "home"]
    for topic in topics:
        assert topic.content and topic.quiz and topic.preference_pairs and topic.voice_pairs
        for item in topic.quiz:
            assert 0 <= item.answer < len(item.choices)


def test_from_dict_builds_items_with_attributes():
    topic = make_topic(
        quiz=[{"question": "Q?", "choices": ["a", "b", "c"], "answer": 2}],
        preference_pairs=[{"prompt": "p", "chosen": "c", "rejected": "r"}],
    )
    assert topic.quiz[0].question == "Q?"
    assert topic.quiz[0].choices == ("a", "b", "c")
    assert topic.quiz[0].answer == 2
    assert (topic.preference_pairs[0].prompt, topic.preference_pairs[0].chosen) == ("p", "c")
    assert Topic.from_dict(topic.to_dict()) == topic


def test_json_topic_file(tmp_path):
    import json

    (tmp_path / "t.json").write_text(json.dumps(make_topic(name="json_topic").to_dict()))
    assert load_topics(tmp_path / "t.json")[0].name == "json_topic"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"quiz": [{"question": "Q?", "choices": ["a", "b"], "answer": 5}]},
            "quiz[0].answer: index 5 is out of range",
        ),
        (
            {"quiz": [{"question": "Q?", "choices": ["a"], "answer": 0}]},
            "quiz[0].choices: needs at least two",
        ),
        ({"quiz": [{"choices": ["a", "b"], "answer": 0}]}, "quiz[0].question: required"),
        (
            {"quiz": [{"question": "Q?", "choices": ["Brine", "Brine", "Brine"], "answer": 0}]},
            "quiz[0].choices[1]: 'Brine' is also choices[0]; the choices of a question must differ",
        ),
        (
            {"quiz": [{"question": "Q?", "choices": ["a", "Brine", " Brine "], "answer": 0}]},
            "quiz[0].choices[2]: 'Brine' is also choices[1]",
        ),
        ({"preference_pairs": [{"prompt": "p", "rejected": "r"}]}, "preference_pairs[0].chosen: required"),
        (
            {"voice_pairs": [{"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}]},
            "voice_pairs[0]: unknown key 'extra'",
        ),
        ({"content": []}, "content: required"),
        ({"name": "../escape"}, "name: '../escape' must be letters"),
        ({"contnet": ["x"]}, "unknown topic key 'contnet'; did you mean 'content'?"),
    ],
)
def test_validation_errors_name_file_item_and_field(tmp_path, change, message):
    path = write_topic(tmp_path)
    import yaml

    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopicError) as excinfo:
        load_topics(path)
    assert str(path) in str(excinfo.value)
    assert message in str(excinfo.value)


def test_duplicate_topic_names_are_an_error(tmp_path):
    write_topic(tmp_path, "a")
    (tmp_path / "b.yaml").write_text((tmp_path / "a.yaml").read_text())
    with pytest.raises(TopicError, match="also the name of the topic in"):
        load_topics(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name: [unclosed", "not valid YAML at line 1"),
        (b"\xff\xfe\x00binary", "is a binary file, not YAML or JSON text"),
        (b"name: caf\xe9\n", "is not valid UTF-8.; save it as UTF-8"),
        (b"- a\n- b\n", "must be a mapping"),
    ],
)
def test_unreadable_topic_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(TopicError, match=message):
        load_topics(path)


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(TopicError, match="no topic files"):
        load_topics(tmp_path)
    with pytest.raises(TopicError, match="not found"):
        load_topics(tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("twice.yaml", "name: a\nquiz: []\ncontent: [x]\nquiz: []\n", "quiz: given twice, at lines 2 and 4"),
        (
            "nested.yaml",
            "name: a\ncontent: [x]\nquiz:\n  - {question: Q, question: R}\n",
            "question: given twice, at lines 4 and 4",
        ),
        ("quoted.yaml", "name: a\ncontent: [x]\n'name': b\n", "name: given twice, at lines 1 and 3"),
        (
            "twice.json",
            '{"name": "a",\n "content": ["x"],\n "s": "\\" \\"name\\": ",\n "name": "b"}',
            "name: given twice, at lines 1 and 4",
        ),
        (
            "nested.json",
            '{"name": "a", "content": ["x"],\n "quiz": [{"question": "Q?",\n "question": "R?"}]}',
            "question: given twice, at lines 2 and 3",
        ),
    ],
)
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TopicError, match=f"^{re.escape(f'{path}: {message}')}; keep one"):
        load_topics(path)


def test_the_same_key_in_different_mappings_and_yaml_merge_keys_are_fine(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "name: a\ncontent: [x]\nquiz:\n  - &q {question: Q, choices: [a, b], answer: 0}\n"
        "  - {<<: *q, question: R}\n"
    )
    (tmp_path / "b.json").write_text(
        '{"name": "b", "content": ["x"], "preference_pairs": [{"prompt": "p", "chosen": "c", "rejected": "r"},'
        ' {"prompt": "p", "chosen": "c", "rejected": "r"}]}'
    )
    first, second = load_topics(tmp_path)
    assert [q.question for q in first.quiz] == ["Q", "R"]
    assert len(second.preference_pairs) == 2


@pytest.mark.parametrize("name", ["first\n", "first\r\n", "\nfirst", "first "])
def test_a_topic_name_is_matched_whole(name):
    with pytest.raises(TopicError, match="must be letters, digits"):
        Topic.from_dict(make_topic(name="x").to_dict() | {"name": name}, "t.yaml")


@pytest.mark.parametrize("name", ["CON", "nul", "LPT1", "com9", "Aux.txt", "prn.tar.gz", "home.", "x.."])
def test_names_windows_cannot_hold_are_refused(name):
    from align.core.topics import check_topic_name
    from align.errors import TopicError

    with pytest.raises(TopicError, match="Windows"):
        check_topic_name(name, "t.yaml")


@pytest.mark.parametrize("name", ["console", "con_job", "nullable", "lpt", "com10", "a" * 100, "v1.2"])
def test_names_that_only_look_like_windows_devices_are_accepted(name):
    from align.core.topics import check_topic_name

    check_topic_name(name, "t.yaml")


def test_a_link_to_a_topic_file_elsewhere_is_read(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    write_topic(notes, "home")
    topics = tmp_path / "topics"
    topics.mkdir()
    (topics / "home.yaml").symlink_to(notes / "home.yaml")
    assert [topic.name for topic in load_topics(topics)] == ["home"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_topic_file_that_begins_with_a_byte_order_mark_is_read(tmp_path, suffix):
    import json

    data = make_topic(name="home").to_dict()
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    (tmp_path / f"home{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Notepad's
    assert [topic.name for topic in load_topics(tmp_path)] == ["home"]


def test_a_topic_built_from_lists_is_still_read_only():
    from align.core.topics import PreferencePair, QuizItem

    topic = Topic(
        name="t",
        content=["a passage"],
        quiz=[QuizItem("Q?", ["yes", "no"], 0)],
        preference_pairs=[PreferencePair("p", "c", "r")],
        voice_pairs=[PreferencePair("p", "c")],
    )
    for value in (
        topic.content,
        topic.quiz,
        topic.preference_pairs,
        topic.voice_pairs,
        topic.quiz[0].choices,
    ):
        assert isinstance(value, tuple)
    assert topic == make_topic(
        name="t",
        content=["a passage"],
        quiz=[{"question": "Q?", "choices": ["yes", "no"], "answer": 0}],
        preference_pairs=[{"prompt": "p", "chosen": "c", "rejected": "r"}],
        voice_pairs=[{"prompt": "p", "chosen": "c"}],
    )
