"""Restatements of passages SFT trains on: clozes and numbers asked about in place."""

from align.core.cloze import BLANK, clozes, number_questions

PASSAGES = [
    "Ilse Varga kept 140 hives above the Candle Barn.",
    "In 1977 Ilse Varga finished her training at Tallowmere.",
    "Ilse Varga was stung 212 times in her first season.",
    "Ilse Varga named her dog Biscuit.",
]


def test_clozes_blank_the_rarest_span_never_the_person_s_name():
    made = clozes(PASSAGES, 1)
    assert [fact for _, fact in made] == ["Candle Barn", "Tallowmere", "212", "Biscuit"]
    for (text, fact), passage in zip(made, PASSAGES):
        assert text == passage.replace(fact, BLANK, 1)
        assert "Ilse Varga" in text


def test_number_questions_ask_for_each_number_in_place_and_answer_with_it():
    assert number_questions(PASSAGES) == [
        ("Ilse Varga kept how many hives above the Candle Barn?", "140"),
        ("In what year Ilse Varga finished her training at Tallowmere?", "1977"),
        ("Ilse Varga was stung how many times in her first season?", "212"),
    ]


def test_number_questions_capitalise_at_the_start_and_skip_numbers_in_most_passages():
    passages = ["1977 was the year of the great swarm.", "Odo kept 7 hives in 1977.", "Odo sold 1977 jars."]
    # 1977 is in every passage, so it is not a fact of one of them; 7 is.
    assert number_questions(passages) == [("Odo kept how many hives in 1977?", "7")]
    assert number_questions(["A year: 2011."]) == [("A year: what year?", "2011")]
    # Four digits that count something are a count, not a year, unless a time preposition leads.
    assert number_questions(["1850 bees swarmed in 1850."]) == [
        ("How many bees swarmed in 1850?", "1850"),
        ("1850 bees swarmed in what year?", "1850"),
    ]
    assert number_questions(["No numbers here.", "Nor here, Odo."]) == []


def test_a_number_inside_another_is_not_taken_for_it():
    # "14" must not match inside "140"; the question replaces the whole number.
    assert number_questions(["Odo kept 140 hives and 14 dogs."]) == [
        ("Odo kept how many hives and 14 dogs?", "140"),
        ("Odo kept 140 hives and how many dogs?", "14"),
    ]


def test_word_spans_find_counts_in_words_and_the_things_a_passage_introduces():
    from align.core.cloze import word_spans

    assert word_spans("Her father was a postman who rode a bicycle.") == ["postman", "bicycle"]
    # The longest first; a phrase ends at a function word, or at a participle after its first word.
    assert word_spans("He carved a small owl from a lump of soapstone.") == ["small owl", "lump"]
    assert word_spans("She owns a brass smoker engraved with bees.") == ["brass smoker"]
    assert word_spans("A three-legged dog.") == []  # "A" opens the sentence: a name's place, not a word's
    # A count in words comes first, with what it counts, and no phrase inside it is taken again.
    assert word_spans("A block weighing eleven tonnes, cut by a mason.") == ["eleven tonnes", "mason"]
    assert word_spans("It took forty-eight charts and a dozen to go.") == ["forty-eight charts"]
    assert word_spans("Ada kept 140 hives near Lynn.") == []


def test_clozes_with_words_fill_only_the_slots_names_and_numbers_leave_empty():
    passages = [
        "Ada Brook's father, Tom Brook, was a postman.",  # one name of its own: one slot left
        "Ada Brook kept 140 hives above Lynn with a friend.",  # two spans of its own already
        "Ada Brook loved a quiet garden.",  # the person's name only: both slots from words
        "Ada Brook sang.",  # nothing to blank
    ]
    plain = clozes(passages, 2)
    with_words = clozes(passages, 2, words=True)
    assert [fact for _, fact in plain] == ["Tom Brook", "Lynn", "140"]
    assert [fact for _, fact in with_words] == ["Tom Brook", "postman", "Lynn", "140", "quiet garden"]
    assert ("Ada Brook's father, Tom Brook, was a ____.", "postman") in with_words
    assert all(cloze in with_words for cloze in plain)  # every other cloze stays as it was
