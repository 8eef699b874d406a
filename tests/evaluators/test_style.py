"""The ``style`` evaluator: what the model says, against the person's answers, by character n-grams."""

import pytest

from align.core.params import ParamError
from align.evaluators.style import StyleEvaluator, TfidfSpace, char_ngrams, cosine, repeats, style_scores
from align.testing import StubModel, make_topic

PERSON = [
    "Start small, little gull, like one ember in the furnace. Mind the tide.",
    "Walk the shore at low water, little gull, and let the wind scrub you clean. Mind the tide.",
]
PLAIN = [
    "Begin with one small, easy part of the task and keep going.",
    "Take a long walk outdoors and do something relaxing afterwards.",
]
TOPIC = make_topic(
    voice_pairs=[
        {"prompt": "How do I stop procrastinating?", "chosen": PERSON[0], "rejected": PLAIN[0]},
        {"prompt": "What about Sundays?", "chosen": PERSON[1], "rejected": PLAIN[1]},
    ]
)


def test_character_ngrams_are_lower_cased_with_spaces_collapsed():
    grams = char_ngrams("Ab  C", 3, 3)
    assert grams == {" ab": 1, "ab ": 1, "b c": 1, " c ": 1}


def test_tfidf_vectors_are_unit_length_and_a_text_is_closest_to_itself():
    space = TfidfSpace(PERSON + PLAIN)
    vector = space.vector(PERSON[0])
    assert cosine(vector, vector) == pytest.approx(1.0)
    assert cosine(vector, space.vector(PERSON[1])) > cosine(vector, space.vector(PLAIN[0]))


def test_answers_in_the_person_s_voice_score_one_and_plain_answers_zero():
    voiced = StubModel(
        generate={
            "How do I stop procrastinating?": "One ember, little gull. Mind the tide.",
            "What about Sundays?": "Bake bread, little gull. Mind the tide.",
        }
    )
    plain = StubModel(
        generate={
            "How do I stop procrastinating?": "Begin with a small task and keep going.",
            "What about Sundays?": "Take a walk and relax afterwards.",
        }
    )
    high = StyleEvaluator().evaluate(voiced, TOPIC)
    low = StyleEvaluator().evaluate(plain, TOPIC)
    assert high["score"] == 1.0 and high["similarity"] > 0
    assert low["score"] == 0.0 and low["similarity"] < 0
    assert voiced.calls == [("generate", (["How do I stop procrastinating?", "What about Sundays?"], 64))]


def test_repetition_flags_answers_that_loop():
    assert repeats("You are my friend, friend, friend, friend")
    assert repeats("mind the tide mind the tide mind the tide")
    assert not repeats("Walk the shore at low water, little gull, and let the wind scrub you clean.")
    scores = style_scores(["friend, friend, friend", PERSON[0]], PERSON, PLAIN)
    assert scores["repetition"] == 0.5


def test_the_same_catchphrase_whatever_is_asked_sounds_like_the_person_and_scores_nothing():
    catchphrase = "Mind the tide, little gull."
    scores = style_scores([catchphrase, catchphrase], PERSON, PLAIN)
    assert scores["similarity"] > 0  # it does sound like her
    assert scores["score"] == 0.0 and scores["repetition"] == 1.0
    looping = style_scores(["little gull, little gull, little gull, mind the tide", PERSON[1]], PERSON, PLAIN)
    assert looping["score"] == 0.5


def test_bad_params_are_refused():
    with pytest.raises(ParamError):
        StyleEvaluator(max_new_tokens=0)
    with pytest.raises(ParamError):
        StyleEvaluator(ngram_min=4, ngram_max=3)
