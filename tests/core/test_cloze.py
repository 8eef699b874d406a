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
