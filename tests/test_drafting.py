"""``align topics draft``: topic files from notes, chat exports and pair files, with no model."""

import json

import pytest
import yaml
from click.testing import CliRunner

from align.cli import cli
from align.core.cloze import BLANK
from align.core.topics import load_topics
from align.drafting import draft_topics

from .conftest import REPO

EXAMPLE = REPO / "examples" / "from-notes"

NOTES = """\
# Childhood

Ilse Varrow was born in 1931 in Brackenford, a village of 212 people.

Her father Tomas Varrow mended nets for the boats of Brackenford.

Q: What do you remember of the village?
A: The smell of tar and the gulls
arguing on the roofs, little gull.

# Later years

In 1979 Ilse bought Wrackhouse on Morrow Head with 400 pounds of savings.

She kept a donkey called Tallow, named after the candles Tomas Varrow made.

Her neighbour Agnes Moor visited every Sunday for 30 years.
"""


def invoke(*args):
    return CliRunner().invoke(cli, list(args), env={"ALIGN_LOAD_PLUGINS": ""})


def test_markdown_sections_become_topics_with_passages_a_cloze_quiz_and_pairs(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    drafted = draft_topics([notes])
    first, second = drafted.topics
    assert (first.name, second.name) == ("childhood", "later_years")
    assert first.content == (
        "Ilse Varrow was born in 1931 in Brackenford, a village of 212 people.",
        "Her father Tomas Varrow mended nets for the boats of Brackenford.",
    )
    # The Q/A lines are a pair, not a passage; its answer's lines are joined; no rejected.
    assert [(p.prompt, p.chosen, p.rejected) for p in first.preference_pairs] == [
        (
            "What do you remember of the village?",
            "The smell of tar and the gulls arguing on the roofs, little gull.",
            None,
        )
    ]
    for topic in drafted.topics:
        assert len(topic.quiz) == len(topic.content)  # a question per passage here
        for item, passage in zip(topic.quiz, topic.content):
            right = item.choices[item.answer]
            assert BLANK in item.question and right in passage
            assert item.question.startswith(passage.replace(right, BLANK, 1).split(BLANK)[0])
            assert len(item.choices) == 4 and len(set(item.choices)) == 4
            kind = "number" if right.isdigit() else "name"
            assert item.question.endswith(f"What is the missing {kind}?")
            for wrong in item.choices:
                # distractors of the same kind, from elsewhere in the material, not in this passage
                assert wrong.isdigit() == right.isdigit()
                assert wrong == right or wrong not in passage
                assert wrong in NOTES
    assert [item.answer for topic in drafted.topics for item in topic.quiz] != [0] * 5  # not always first
    assert draft_topics([notes]).files == drafted.files  # the same material drafts the same files


def test_the_drafts_pass_validate_and_the_command_says_what_it_could_not_draft(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES + "\n# Weather\n\nit rained often and the wind blew hard.\n", encoding="utf-8")
    out = tmp_path / "topics"
    result = invoke("topics", "draft", str(notes), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert (
        f"wrote {out / '01_childhood.yaml'}: 2 passages, 2 quiz questions, 1 preference pairs, 0 voice pairs"
        in (result.output)
    )
    could_not = result.output.split("# could not draft\n", 1)[1]
    assert (
        "- topic 'weather': passage 1 ('it rained often and the wind blew hard.'): no number, name or rare word"
        in (could_not)
    )
    assert "- topic 'later_years': no Q/A lines or pairs went with it" in could_not
    assert "- topic 'childhood': one pair, trained on; none left to hold out as voice_pairs" in could_not
    assert sorted(p.name for p in out.iterdir()) == [
        "01_childhood.yaml",
        "02_later_years.yaml",
        "03_weather.yaml",
    ]
    # Every draft is a valid topic; an SFT-and-quiz protocol validates on them all.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"protocol": [{"name": "sft", "train": "sft"}]}))
    result = invoke("validate", str(config), "--topics", str(out))
    assert result.exit_code == 0, result.output
    assert "- weather" in result.output


def test_too_few_spans_of_a_kind_for_distractors_is_said(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("Ilse was born in 1931.\n\nShe loved the sea.\n", encoding="utf-8")
    drafted = draft_topics([notes])
    assert drafted.topics[0].quiz == ()
    assert drafted.notes[0] == (
        "topic 'notes': passage 1 ('Ilse was born in 1931.'): only 0 other numbers in the material to draw "
        "distractors from (3 needed), so no quiz question from it"
    )


def test_a_chat_export_s_person_turns_become_pairs_of_the_closest_topic(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    chat = tmp_path / "chat.json"
    chat.write_text(
        json.dumps(
            [
                {"role": "user", "content": "Tell me about the donkey."},
                {"role": "assistant", "content": "Tallow, stubborn as Wrackhouse's door, little gull."},
                {"role": "user", "content": "And your father?"},
                {"role": "assistant", "content": "He mended nets for every boat in Brackenford."},
            ]
        ),
        encoding="utf-8",
    )
    first, second = draft_topics([notes, chat]).topics
    assert [p.prompt for p in first.preference_pairs + first.voice_pairs] == [
        "What do you remember of the village?",
        "And your father?",
    ]
    assert [(p.prompt, p.rejected) for p in second.preference_pairs] == [("Tell me about the donkey.", None)]
    # A chat alone is a topic of the person's answers.
    (alone,) = draft_topics([chat]).topics
    assert alone.name == "chat" and alone.content[0].startswith("Tallow, stubborn")


def test_a_pairs_file_without_rejected_is_drafted_into_the_topics(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {"prompt": "Where did you live later?", "chosen": "Wrackhouse on Morrow Head, with Tallow."}
        )
        + "\n"
    )
    _, later = draft_topics([notes, pairs]).topics
    assert [p.prompt for p in later.preference_pairs] == ["Where did you live later?"]


def test_the_example_s_drafts_are_what_the_command_drafts_and_validate(tmp_path):
    out = tmp_path / "topics"
    result = invoke(
        "topics", "draft", str(EXAMPLE / "notes.md"), str(EXAMPLE / "pairs.jsonl"), "--output", str(out)
    )
    assert result.exit_code == 0, result.output
    committed = EXAMPLE / "topics"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in out.iterdir():
        assert path.read_text() == (committed / path.name).read_text(), path.name
    result = invoke("validate", "--topics", str(committed))
    assert result.exit_code == 0, result.output
    assert (
        f"  {committed / '03_leaving_the_light.yaml'}: voice_pairs: 1 without rejected; the bare model's answers, "
        "generated before training, take their place"
    ) in result.output
    assert all(topic.voice_pairs and topic.preference_pairs for topic in load_topics(committed))


@pytest.mark.parametrize("name", ["notes.pdf", "missing.md"])
def test_what_cannot_be_drafted_from_is_one_line(tmp_path, name):
    if name.endswith(".pdf"):
        (tmp_path / name).write_bytes(b"%PDF-1.4")
    result = invoke("topics", "draft", str(tmp_path / name), "--output", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert not (tmp_path / "out").exists()


def test_the_example_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    """The drafts have no rejected answers: DPO generates its own, the voice pairs get the bare
    model's, and the style evaluator scores against them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sft": {"epochs": 1, "cloze": 1},
                "dpo": {"max_steps": 1, "rejected_max_new_tokens": 8},
                "protocol": [
                    {"name": "sft", "train": "sft"},
                    {"name": "dpo", "train": "dpo"},
                    {"name": "after", "evaluate": ["quiz", "voice", {"use": "style", "max_new_tokens": 8}]},
                ],
            }
        )
    )
    out = tmp_path / "run"
    result = invoke(
        "run",
        str(config),
        "--model",
        str(tiny_model_dir),
        "--topics",
        str(EXAMPLE / "topics"),
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [t["topic"] for t in summary["topics"]] == ["the_lighthouse", "the_garden", "leaving_the_light"]
    for topic in summary["topics"]:
        (after,) = [s for s in topic["steps"] if s["step"] == "after"]
        assert {"quiz.accuracy", "voice.score", "style.score"} <= set(after["metrics"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    purposes = [(e["topic"], e["purpose"]) for e in events if e["kind"] == "generated"]
    assert purposes == [
        ("", "voice_rejected"),
        ("the_lighthouse", "rejected"),
        ("the_garden", "rejected"),
        ("leaving_the_light", "rejected"),
    ]


def test_q_and_a_lines_bold_or_not_and_an_answer_without_a_question_stays_text():
    from align.drafting import _split_qa

    text, pairs = _split_qa(
        "A: no question before me\n\n**Q:** Who?\n**A:** Me,\nlittle gull.\n\nA. Smith wrote it."
    )
    assert pairs == [{"prompt": "Who?", "chosen": "Me, little gull."}]
    assert "A: no question before me" in text and "A. Smith wrote it." in text and "Who?" not in text
