"""Topic fields that name data files: the formats people already have, read through ``datasets``."""

import json

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.core.sources import passages
from align.core.topics import PreferencePair, QuizItem, load_topics
from align.errors import TopicError

STANDARD = [
    {
        "prompt": "Where do you live?",
        "chosen": "Wrackhouse, little gull.",
        "rejected": "A house.",
        "score_chosen": 9,
    },
    {"prompt": "Any advice?", "chosen": "Mind the tide.", "rejected": "Be careful.", "score_chosen": 7},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "How are you?"}],
        "chosen": [{"role": "assistant", "content": "Bright as a gull, love."}],
        "rejected": [{"role": "assistant", "content": "Fine."}],
    },
    {  # the prompt implicit in the messages before the last assistant turn
        "chosen": [
            {"role": "user", "content": "Tea?"},
            {"role": "assistant", "content": "Always, with salt on the wind."},
        ],
        "rejected": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes."}],
    },
]
CHAT_EXPORT = [
    {"role": "system", "content": "An interview."},
    {"role": "user", "content": "What do you do all day?"},
    {"role": "assistant", "content": "Mend nets and watch the swell, little gull."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "Count the lighthouse flashes."},
]
QUIZ = [
    {"question": "What is Ilse's house called?", "choices": ["Wrackhouse", "Gullcroft"], "answer": 0},
    {"question": "What is the donkey called?", "choices": ["Brine", "Tallow", "Kelp"], "answer": "Tallow"},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def topic_file(directory, **fields):
    data = {"name": "home", "content": ["Ilse lives in Wrackhouse."], **fields}
    path = directory / "home.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def formats(tmp_path):
    """A topic directory whose one topic reads every built-in format."""
    from datasets import Dataset

    topics = tmp_path / "topics"
    (topics / "data").mkdir(parents=True)
    (topics / "notes").mkdir()
    (topics / "notes" / "01.md").write_text(
        "---\ntags: [home]\n---\n# Home\n\nIlse lives in Wrackhouse\non Morrow Head.\n\n## Animals\n\n"
        "Her donkey is called Tallow.\n",
        encoding="utf-8",
    )
    (topics / "notes" / "02.txt").write_text("She keeps bees.\n", encoding="utf-8")
    jsonl(topics / "data" / "pairs.jsonl", STANDARD)
    jsonl(topics / "data" / "conversational.jsonl", CONVERSATIONAL)
    (topics / "data" / "chat.json").write_text(json.dumps(CHAT_EXPORT), encoding="utf-8")
    Dataset.from_list(QUIZ[:1]).to_parquet(str(topics / "data" / "quiz.parquet"))
    (topics / "data" / "quiz.csv").write_text(
        'q,options,right\nWhat is the donkey called?,"Brine | Tallow | Kelp",Tallow\n', encoding="utf-8"
    )
    Dataset.from_list(STANDARD[:1]).save_to_disk(str(topics / "data" / "saved"))
    topic_file(
        topics,
        content={"path": "notes"},
        quiz=[
            "data/quiz.parquet",
            {"path": "data/quiz.csv", "columns": {"question": "q", "choices": "options", "answer": "right"}},
        ],
        preference_pairs=["data/pairs.jsonl", "data/conversational.jsonl", "data/saved"],
        voice_pairs="data/chat.json",
    )
    return topics


def test_every_format_becomes_the_topic_s_items(formats):
    (topic,) = load_topics(formats)
    assert topic.content == (
        "Ilse lives in Wrackhouse on Morrow Head.",
        "Her donkey is called Tallow.",
        "She keeps bees.",
    )
    assert topic.quiz == (
        QuizItem("What is Ilse's house called?", ("Wrackhouse", "Gullcroft"), 0),
        QuizItem("What is the donkey called?", ("Brine", "Tallow", "Kelp"), 1),
    )
    assert topic.preference_pairs == (
        PreferencePair("Where do you live?", "Wrackhouse, little gull.", "A house."),  # score_chosen left out
        PreferencePair("Any advice?", "Mind the tide.", "Be careful."),
        PreferencePair("How are you?", "Bright as a gull, love.", "Fine."),
        PreferencePair("Tea?", "Always, with salt on the wind.", "Yes."),
        PreferencePair("Where do you live?", "Wrackhouse, little gull.", "A house."),  # save_to_disk
    )
    # A chat export: the person's (assistant) turns are chosen, with no rejected answer.
    assert topic.voice_pairs == (
        PreferencePair("What do you do all day?", "Mend nets and watch the swell, little gull."),
        PreferencePair("And at night?", "Count the lighthouse flashes."),
    )


def test_reading_writes_nothing_beside_the_data(formats):
    before = sorted(p.relative_to(formats) for p in formats.rglob("*"))
    load_topics(formats)
    assert sorted(p.relative_to(formats) for p in formats.rglob("*")) == before


def test_a_data_file_a_topic_names_is_not_read_as_a_topic(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(STANDARD), encoding="utf-8")
    topic_file(tmp_path, preference_pairs="pairs.json")
    assert [t.name for t in load_topics(tmp_path)] == ["home"]


def test_a_message_list_prompt_of_several_turns_is_a_transcript(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be Ilse."},
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Ahoy."},
                {"role": "user", "content": "Where?"},
                {"role": "assistant", "content": "Wrackhouse."},
            ]
        }
    ]
    jsonl(tmp_path / "chats.jsonl", rows)
    (topic,) = load_topics(topic_file(tmp_path, preference_pairs="chats.jsonl"))
    assert topic.preference_pairs == (
        PreferencePair("User: Hi.\n\nAssistant: Ahoy.\n\nUser: Where?", "Wrackhouse."),
    )


def test_passages_split_at_blank_lines_without_headings():
    assert passages("# Title\n\nOne\ntwo.\r\n\r\n  \nThree.\n### Sub\nFour.") == ["One two.", "Three. Four."]


@pytest.mark.parametrize(
    ("rows", "field", "message"),
    [
        (
            [{"prompt": "p", "answer": "a"}],
            {},
            "no column 'chosen' for preference_pairs (the file's columns: prompt, answer)",
        ),
        ([{"prompt": "p", "chosen": 5}], {}, "row 1, column 'chosen': must be a non-empty string, got int"),
        (
            [{"q": "p", "c": 3}],
            {"prompt": "q", "chosen": "c"},
            "row 1, column 'c': must be a non-empty string, got int",
        ),
        (
            [{"prompt": "p", "chosen": [{"role": "user", "content": "x"}]}],
            {},
            "row 1, column 'chosen': has no assistant turn",
        ),
        (
            [{"prompt": "p", "chosen": [{"text": "x"}]}],
            {},
            "row 1, column 'chosen': must be a string, or a list of messages",
        ),
    ],
)
def test_row_errors_name_the_file_the_row_and_the_column(tmp_path, rows, field, message):
    jsonl(tmp_path / "pairs.jsonl", rows)
    reference = {"path": "pairs.jsonl", "columns": field} if field else "pairs.jsonl"
    with pytest.raises(TopicError) as excinfo:
        load_topics(topic_file(tmp_path, preference_pairs=reference))
    assert str(excinfo.value).startswith(f"{tmp_path / 'pairs.jsonl'}: {message}")


def test_a_column_mapping_names_only_known_fields(tmp_path):
    jsonl(tmp_path / "pairs.jsonl", STANDARD)
    with pytest.raises(TopicError, match=r"columns: unknown field 'promt'; did you mean 'prompt'\?"):
        load_topics(topic_file(tmp_path, preference_pairs={"path": "pairs.jsonl", "columns": {"promt": "q"}}))


def test_a_file_reference_in_a_topic_not_read_from_a_file_is_an_error():
    from align.core.topics import Topic

    with pytest.raises(TopicError, match="not read from a file; list the items instead"):
        Topic.from_dict({"name": "a", "content": ["x"], "quiz": "quiz.jsonl"}, "topics.json[0]")


def test_a_plain_string_content_is_still_refused_as_not_a_list(tmp_path):
    with pytest.raises(TopicError, match="content: must be a list of strings, got str"):
        load_topics(topic_file(tmp_path, content="Ilse lives in Wrackhouse on Morrow Head."))


def test_validate_and_a_tiny_run_read_every_format_and_record_the_rows(formats, tmp_path, tiny_model_dir):
    env = {"ALIGN_LOAD_PLUGINS": ""}
    result = CliRunner().invoke(cli, ["validate", "--topics", str(formats)], env=env)
    assert result.exit_code == 0, result.output
    assert (
        f"- home ({formats / 'home.yaml'}): 3 passages, 2 quiz items, 5 preference pairs, 2 voice pairs"
        in (result.output)
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sft": {"epochs": 1, "cloze": 0},
                "dpo": {"max_steps": 1},
                "protocol": [
                    {"name": "sft", "train": "sft"},
                    {"name": "dpo", "train": "dpo"},
                    {"name": "after", "evaluate": ["quiz", "voice"]},
                ],
            }
        )
    )
    out = tmp_path / "run"
    args = [
        "run",
        str(config),
        "--model",
        str(tiny_model_dir),
        "--topics",
        str(formats),
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    (expected,) = load_topics(formats)
    recorded = json.loads((out / "topics.json").read_text())
    # The rows as read, inline: a resumed run trains on them even if the files change.
    assert recorded[0]["preference_pairs"] == [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in expected.preference_pairs
    ]
    assert recorded[0]["content"] == list(expected.content)
    # The voice pairs without rejected got the bare model's answers, recorded once.
    assert all(isinstance(pair["rejected"], str) for pair in recorded[0]["voice_pairs"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    generated = [e for e in events if e["kind"] == "generated"]
    assert [e["purpose"] for e in generated] == ["voice_rejected"]
    assert [a["answer"] for a in generated[0]["answers"]] == [
        p["rejected"] for p in recorded[0]["voice_pairs"]
    ]


def test_validate_warns_of_a_data_file_no_topic_names(tmp_path):
    """It was silently ignored: a pairs file dropped beside the topics is not read."""
    topics = tmp_path / "topics"
    (topics / "notes").mkdir(parents=True)
    (topics / "notes" / "a.md").write_text("Ilse lives in Wrackhouse.\n", encoding="utf-8")
    jsonl(topics / "pairs.jsonl", STANDARD)
    jsonl(topics / "used.jsonl", STANDARD)
    topic_file(topics, content={"path": "notes"}, preference_pairs="used.jsonl")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"protocol": [{"name": "sft", "train": "sft"}]}))
    result = CliRunner().invoke(
        cli, ["validate", str(config), "--topics", str(topics)], env={"ALIGN_LOAD_PLUGINS": ""}
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "no topic names" in line]
    assert warnings == [
        f"Warning: {topics / 'pairs.jsonl'}: a data file that no topic names, so it is not read; name it in a "
        "topic (e.g. preference_pairs: pairs.jsonl) or move it out of the topic directory"
    ]


def test_empty_rejected_cells_of_a_csv_are_pairs_without_rejected(tmp_path):
    (tmp_path / "pairs.csv").write_text(
        "prompt,chosen,rejected\nWhere?,Here.,\nWhy?,Because.,No.\n", encoding="utf-8"
    )
    (tmp_path / "more.jsonl").write_text(
        json.dumps({"prompt": "Who?", "chosen": "Me.", "rejected": " "}) + "\n"
    )
    (topic,) = load_topics(topic_file(tmp_path, preference_pairs=["pairs.csv", "more.jsonl"]))
    assert topic.preference_pairs == (
        PreferencePair("Where?", "Here."),
        PreferencePair("Why?", "Because.", "No."),
        PreferencePair("Who?", "Me."),
    )


def test_inline_pairs_may_be_written_as_messages(tmp_path):
    (topic,) = load_topics(topic_file(tmp_path, voice_pairs=[*CONVERSATIONAL, {"messages": CHAT_EXPORT}]))
    assert topic.voice_pairs == (
        PreferencePair("How are you?", "Bright as a gull, love.", "Fine."),
        PreferencePair("Tea?", "Always, with salt on the wind.", "Yes."),
        PreferencePair(
            "User: What do you do all day?\n\nAssistant: Mend nets and watch the swell, little gull.\n\n"
            "User: And at night?",
            "Count the lighthouse flashes.",
        ),
    )
    with pytest.raises(TopicError, match=r"home.yaml: voice_pairs\[0\].chosen: has no assistant turn"):
        load_topics(topic_file(tmp_path, voice_pairs=[{"chosen": [{"role": "user", "content": "Hi"}]}]))
