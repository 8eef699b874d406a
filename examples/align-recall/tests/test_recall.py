"""Tests for the recall evaluator, written the way any align plugin's tests can be: the fixtures
(`stub_model`, `make_topic`, `plugin_manager`) come from align's pytest plugin, no torch model."""

import pytest

import align_recall
from align_recall import RecallEvaluator, key_terms, mentions, normalize

QUIZ = [
    {"question": "What does Ilse call her furnace?", "choices": ["Old Saffie", "Old Tansy"], "answer": 0},
    {"question": "How many charts did Ilse draw?", "choices": ["thirty-six", "forty-eight"], "answer": 1},
    {"question": "Who was her apprentice?", "choices": ["Tobin Quell", "Rufus Dray"], "answer": 0},
]
CONTENT = [
    "Ilse Varrow's furnace is a kiln she calls Old Saffie.",
    "She drew 48 charts for the Skerrowmoor Tide Atlas.",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Forty-eight charts!", "48 charts"),
        ("two hundred and twelve floats", "212 floats"),
        ("Café  Crème", "cafe creme"),
        ("one thousand nine hundred and eighty-nine", "1989"),
        ("and then", "and then"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_mentions_needs_whole_words():
    assert mentions("She calls it Old Saffie, of course.", "old saffie")
    assert mentions("I drew 48 of them", "forty-eight")
    assert not mentions("Old Saffiere", "Old Saffie")


def test_key_terms_skip_what_the_questions_give_away(make_topic):
    topic = make_topic(content=CONTENT, quiz=QUIZ)
    terms = key_terms(topic)
    assert "old saffie" in terms
    assert "48" in terms
    assert "skerrowmoor tide atlas" in terms
    assert "ilse varrow s" not in terms and "ilse" not in terms  # named in a question


def test_scores_right_wrong_and_silent_answers(stub_model, make_topic):
    topic = make_topic(content=CONTENT, quiz=QUIZ)
    model = stub_model(
        generate={
            QUIZ[0]["question"]: "She calls it Old Saffie.",
            QUIZ[1]["question"]: "Thirty-six, I think.",
            QUIZ[2]["question"]: "I do not know.",
        }
    )
    scores = RecallEvaluator(max_new_tokens=16).evaluate(model, topic)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["confusion"] == pytest.approx(1 / 3)
    assert scores["coverage"] == pytest.approx(1 / len(key_terms(topic)))
    # One batched call with the questions alone, never the choices.
    assert model.calls == [("generate", ([item["question"] for item in QUIZ], 16))]


def test_an_answer_naming_every_choice_is_not_right(stub_model, make_topic):
    topic = make_topic(quiz=QUIZ[:1])
    model = stub_model(generate=lambda prompt: "Old Saffie or Old Tansy")
    assert RecallEvaluator().evaluate(model, topic)["accuracy"] == 0.0


def test_bad_params_are_rejected():
    from align import ParamError

    with pytest.raises(ParamError, match="max_new_tokens"):
        RecallEvaluator(max_new_tokens=0)


def test_registers_through_the_align_hook(plugin_manager):
    plugin_manager.register(align_recall)
    assert plugin_manager.registry.get("evaluator", "recall").factory is RecallEvaluator


def test_is_installed_as_an_entry_point():
    from align.plugins.manager import load_plugins

    plugins = load_plugins(environ={"ALIGN_LOAD_PLUGINS": "recall"})
    assert plugins.registry.get("evaluator", "recall").plugin == "recall"


def test_gates_a_training_step_inside_the_topic_loop(plugin_manager, stub_model, make_topic):
    from align.testing import StubObjective, StubPlugin

    plugin_manager.register(align_recall)
    plugin_manager.add_builtins(["threshold"])
    train = StubObjective()
    plugin_manager.register(StubPlugin(objectives={"polish": train}))
    knows = stub_model(
        generate=lambda q: "Old Saffie" if "furnace" in q else "48" if "charts" in q else "Tobin Quell"
    )
    guesses = stub_model(generate=lambda q: "Old Tansy")
    protocol = [
        {"name": "check", "evaluate": ["recall"]},
        {
            "name": "polish",
            "train": "polish",
            "gate": {"use": "threshold", "all": ["recall.accuracy >= 0.5"]},
        },
    ]
    topic = make_topic(content=CONTENT, quiz=QUIZ)
    passed = plugin_manager.run(protocol, [topic], model=knows)
    assert passed.ran("topic", "polish")
    failed = plugin_manager.run(protocol, [topic], model=guesses)
    assert not failed.ran("topic", "polish")
    assert failed.step("topic", "polish")["gate"]["reason"] == "recall.accuracy 0.00 < 0.50"
    assert train.calls == ["topic"]
