import math

import pytest

from align.evaluators.quiz import QuizEvaluator
from align.evaluators.voice import VoiceEvaluator


def quiz_topic(make_topic):
    return make_topic(
        quiz=[
            {"question": "Q1?", "choices": ["aa", "bb", "cc"], "answer": 1},
            {"question": "Q2?", "choices": ["dd", "ee"], "answer": 0},
        ]
    )


def test_quiz_accuracy_picks_the_most_likely_choice(stub_model, make_topic):
    model = stub_model(loglikelihood={"aa": -5.0, "bb": -1.0, "cc": -3.0, "dd": -9.0, "ee": -2.0})
    result = QuizEvaluator(normalize="none").evaluate(model, quiz_topic(make_topic))
    # Q1 right (bb), Q2 wrong (ee beats dd); the margin is the right choice's score minus the
    # best wrong one's: bb - cc = 2, dd - ee = -7
    assert result == {"accuracy": 0.5, "margin": pytest.approx((2.0 - 7.0) / 2)}
    # one batched call, every choice of every question scored against its own question
    assert model.calls == [("loglikelihood", (["Q1?"] * 3 + ["Q2?"] * 2, ["aa", "bb", "cc", "dd", "ee"]))]


def test_quiz_chars_normalisation_divides_by_length(stub_model, make_topic):
    topic = make_topic(quiz=[{"question": "Q?", "choices": ["a long right answer", "no"], "answer": 0}])
    model = stub_model(loglikelihood={"a long right answer": -10.0, "no": -2.0})
    assert QuizEvaluator(normalize="none").evaluate(model, topic)["accuracy"] == 0.0
    chars = QuizEvaluator(normalize="chars").evaluate(model, topic)
    assert chars["accuracy"] == 1.0
    assert chars["margin"] == pytest.approx(-10.0 / 19 - -2.0 / 2)


def test_voice_score_is_the_fraction_of_pairs_preferring_chosen(stub_model, make_topic):
    topic = make_topic(
        voice_pairs=[
            {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
            {"prompt": "p3", "chosen": "c3", "rejected": "r3"},
            {"prompt": "p4", "chosen": "c4", "rejected": "r4"},
        ]
    )
    scores = {("p1", "c1"): -1, ("p1", "r1"): -2, ("p2", "c2"): -1, ("p2", "r2"): -3,
              ("p3", "c3"): -4, ("p3", "r3"): -2, ("p4", "c4"): -2, ("p4", "r4"): -2}  # fmt: skip
    result = VoiceEvaluator(normalize="none").evaluate(stub_model(loglikelihood=scores), topic)
    assert result["score"] == 0.5  # a tie is not a preference
    assert result["margin"] == pytest.approx((1 + 2 - 2 + 0) / 4)


def test_voice_uses_held_out_pairs_not_training_pairs(stub_model, make_topic):
    topic = make_topic()
    model = stub_model()
    VoiceEvaluator().evaluate(model, topic)
    ((_, (prompts, completions)),) = model.calls
    assert set(prompts) == {topic.voice_pairs[0].prompt}
    assert topic.preference_pairs[0].chosen not in completions


def test_stub_model_reports_missing_answers(stub_model):
    model = stub_model(loglikelihood={"x": -1.0}, generate={"hi": "hello"})
    assert model.generate(["hi"]) == ["hello"]
    with pytest.raises(KeyError, match="no log-likelihood for completion 'y'"):
        model.loglikelihood(["p"], ["y"])
    assert math.isclose(stub_model(loglikelihood=lambda p, c: -len(c)).loglikelihood(["p"], ["abc"])[0], -3)
