"""Cloze restatements of passages: a passage with one of its facts blanked out, and the fact.

A fact stated once is memorised but hard to retrieve as an answer: a model trained on
"Ilse's boat was called the Grey Wren" has seen "Grey Wren" continue a sentence, never answer a
question. Rewording each fact as a question helps a model answer it later (Physics of Language
Models, part 3.1: rephrasing beats repetition), and the cheapest rewording that needs no other
model is a cloze: the passage with its fact replaced by a blank, answered by the fact. The blanks
are the spans that carry facts: numbers, names (runs of capitalised words), quoted words; among
them, the ones rarest in the passages around it, so a name every passage repeats (the person's
own) is not the one blanked.

Clozes are made from passages only, never from quiz items.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

BLANK = "____"
_QUOTED = re.compile(r"[\"“]([^\"”]{2,60})[\"”]")
_NUMBER = re.compile(r"(?<![\w.])\d(?:[\d,]*\d)?(?:\.\d+)?(?![\w])")
_CONNECTOR = r"(?:of|the|de|van|von|and)"
_NAME = re.compile(rf"\b[A-Z][\w’'-]*(?:\s+(?:{_CONNECTOR}\s+)?[A-Z][\w’'-]*)*")
_POSSESSIVE = re.compile(r"['’]s$")
#: Capitalised words that open a sentence or a phrase without being part of a name.
_FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "when",
        "in",
        "at",
        "as",
        "it",
        "on",
        "after",
        "before",
        "during",
        "while",
        "by",
        "for",
        "from",
        "with",
        "her",
        "his",
        "their",
        "its",
        "my",
        "our",
        "your",
        "each",
        "every",
        "this",
        "that",
        "these",
        "those",
        "then",
        "once",
        "since",
        "until",
        "if",
        "so",
        "but",
        "and",
        "or",
        "of",
        "to",
    ]
)


def _strip_function_words(span: str) -> str:
    words = span.split()
    while words and words[0].lower() in _FUNCTION_WORDS:
        words.pop(0)
    return " ".join(words)


def fact_spans(passage: str) -> list[str]:
    """The spans of ``passage`` that may carry a fact, in order of appearance (duplicates dropped):
    quoted words, numbers, and names (a possessive ``'s`` left out)."""
    found: list[tuple[int, str]] = []
    for match in _QUOTED.finditer(passage):
        found.append((match.start(1), match.group(1)))
    for match in _NUMBER.finditer(passage):
        found.append((match.start(), match.group()))
    for match in _NAME.finditer(passage):
        span = _strip_function_words(_POSSESSIVE.sub("", match.group()))
        if span:
            found.append((match.start(), span))
    spans: list[str] = []
    for _, span in sorted(found):
        if len(span) >= 2 and span not in spans and not any(span in other for other in spans):
            spans.append(span)
    return spans


def span_kind(span: str) -> str:
    """What a fact span is: a ``number``, a ``name`` (capitalised), or another ``word``."""
    if _NUMBER.fullmatch(span):
        return "number"
    return "name" if span[:1].isupper() else "word"


def _spread(spans: Sequence[Sequence[str]]) -> tuple[Counter[str], float]:
    """How many passages each span is in (``spans``: each passage's), and the count above which a
    span is too common to be one passage's fact: more than half the passages, and more than two
    (the person's own name, in nearly every passage)."""
    frequency: Counter[str] = Counter(span for found in spans for span in set(found))
    return frequency, max(2, len(spans) / 2)


_NUMBER_WORD = (
    r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    r"sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|"
    r"hundred|thousand|dozen)"
)
#: A count written in words and what it counts: "eleven tonnes", "forty-two hives".
_COUNTED = re.compile(rf"\b{_NUMBER_WORD}(?:[\s-]+{_NUMBER_WORD})*\s+[a-z][a-z'-]+")
#: The words after "a" or "an": a thing the passage introduces ("a postman", "an old lifeboat sail").
_INTRODUCED = re.compile(r"\b(?:a|an)\s+([a-z][a-z'-]*(?:\s+[a-z][a-z'-]*){0,2})")
#: Words that end such a phrase: what follows the thing, not the thing.
_PHRASE_END = _FUNCTION_WORDS | frozenset(
    [
        "who",
        "whom",
        "whose",
        "which",
        "where",
        "he",
        "she",
        "they",
        "was",
        "is",
        "were",
        "are",
        "had",
        "has",
        "known",
        "called",
        "named",
        "about",
        "than",
        "into",
        "over",
        "under",
        "near",
        "all",
        "around",
        "built",
        "made",
        "sewn",
        "cut",
        "set",
        "kept",
    ]
)


def _participle(word: str) -> bool:
    return "-" not in word and word.endswith(("ed", "ing"))


def word_spans(passage: str) -> list[str]:
    """Facts written in plain lowercase words, which :func:`fact_spans` does not see: counts in
    words with what they count ("eleven tonnes"), then the things the passage introduces with
    "a" or "an" ("a postman who" gives "postman", "a small owl" "small owl"), the longest first.
    A phrase ends at a function word or, after its first word, at a participle ("a brass smoker
    engraved with" gives "brass smoker"); a count without a thing counted ("a dozen") is none."""
    counted = [
        match.group() for match in _COUNTED.finditer(passage) if match.group().split()[-1] not in _PHRASE_END
    ]
    introduced: list[str] = []
    for match in _INTRODUCED.finditer(passage):
        words: list[str] = []
        for word in match.group(1).split():
            if word in _PHRASE_END or (words and _participle(word)):
                break
            words.append(word)
        if (
            words
            and not re.fullmatch(_NUMBER_WORD, words[0])
            and not any(" ".join(words) in c for c in counted)
        ):
            introduced.append(" ".join(words))
    introduced.sort(key=lambda span: -len(span.split()))  # stable: equally long ones in order
    spans: list[str] = []
    for span in counted + introduced:
        if span not in spans:
            spans.append(span)
    return spans


def clozes(passages: Sequence[str], per_passage: int = 1, words: bool = False) -> list[tuple[str, str]]:
    """Up to ``per_passage`` clozes of each passage, in order (:func:`passage_clozes`, flattened)."""
    return [made for of_passage in passage_clozes(passages, per_passage, words) for made in of_passage]


def passage_clozes(
    passages: Sequence[str], per_passage: int = 1, words: bool = False
) -> list[list[tuple[str, str]]]:
    """Up to ``per_passage`` clozes of each passage: ``(passage with the span blanked, span)``.

    The spans blanked are those that occur in the fewest of ``passages`` (ties: the later in the
    passage, where sentences tend to put what is new); a span in more than half of the passages
    (the person's name) is never blanked, and a passage with no other span gives none. With
    ``words``, a passage with fewer names, numbers and quoted words than ``per_passage`` fills the
    rest from :func:`word_spans` (the facts in plain words: "a postman", "eleven tonnes"), so the
    clozes of every other passage stay as they are.
    """
    spans = [fact_spans(passage) for passage in passages]
    frequency, common = _spread(spans)
    plain = [word_spans(passage) for passage in passages] if words else [[] for _ in passages]
    plain_frequency, plain_common = _spread(plain)
    made: list[list[tuple[str, str]]] = []
    for passage, found, extra in zip(passages, spans, plain):
        made.append([])
        candidates = [(i, span) for i, span in enumerate(found) if frequency[span] <= common]
        ranked = [span for _, span in sorted(candidates, key=lambda item: (frequency[item[1]], -item[0]))]
        chosen = ranked[:per_passage]
        for span in extra:
            if len(chosen) >= per_passage:
                break
            if plain_frequency[span] <= plain_common and not any(span in c or c in span for c in chosen):
                chosen.append(span)
        for span in chosen:
            made[-1].append((passage.replace(span, BLANK, 1), span))
    return made


#: Four digits from 1000 to 2099, which may be a year ...
_YEAR = re.compile(r"1\d{3}|20\d{2}")
#: ... when a preposition of time comes before it ("in 1977 and"), or no word after ("In 1970 Ada",
#: "the year 2011."); otherwise a count ("1850 bees").
_TIME_BEFORE = re.compile(
    r"\b(?:in|since|by|from|until|till|of|after|before|around|circa)\s+$", re.IGNORECASE
)
_WORD_AFTER = re.compile(r"\s+[a-z]")


def _is_year(passage: str, match: re.Match[str]) -> bool:
    if not _YEAR.fullmatch(match.group()):
        return False
    before, after = passage[: match.start()], passage[match.end() :]
    return bool(_TIME_BEFORE.search(before)) or not _WORD_AFTER.match(after)


def number_questions(passages: Sequence[str]) -> list[tuple[str, str]]:
    """Each number of each passage asked about in place: ``(question, number)``.

    "Odalys kept 140 hives on the hill." becomes "Odalys kept how many hives on the hill?",
    answered "140"; a year becomes "what year" ("finished in what year?", but "1850 bees" is
    a count). A cloze shows the sentence with a gap; this asks for the fact as a question does,
    which is how a quiz will ask for it, and numbers are the facts a run loses first
    (docs/quality.md, "What is lost, question by question"): a number is a short answer among
    others of its kind, so a small drift in the weights flips it. A number too common to be one
    passage's fact is not asked about (:func:`_spread`, the rule that keeps :func:`clozes` from
    blanking the person's name), and a passage with no number gives none.
    """
    numbers = [list(_NUMBER.finditer(passage)) for passage in passages]
    frequency, common = _spread([[match.group() for match in found] for found in numbers])
    made = []
    for passage, found in zip(passages, numbers):
        for match in found:
            span = match.group()
            if frequency[span] > common:
                continue
            phrase = "what year" if _is_year(passage, match) else "how many"
            if match.start() == 0:
                phrase = phrase.capitalize()
            question = passage[: match.start()] + phrase + passage[match.end() :]
            made.append((question.rstrip().rstrip(".!;:,") + "?", span))
    return made
