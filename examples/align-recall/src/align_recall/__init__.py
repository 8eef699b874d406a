"""``recall``: open-ended recall of a topic's facts, scored on the model's own generated answers.

align's built-in ``quiz`` evaluator shows the model the choices and asks which is most likely,
which can be right by elimination. ``recall`` asks each quiz question with no choices, lets the
model answer freely (greedy), and checks which choice, if any, the answer names:

* ``recall.accuracy``: the fraction of answers that name the right choice and no wrong one;
* ``recall.confusion``: the fraction that name a wrong choice (a confident mistake);
* ``recall.coverage``: the fraction of the topic's key terms (names and numbers in its content
  that no question gives away) mentioned anywhere in the answers.

Matching ignores case, accents and punctuation, and reads number words as numbers, so
"forty-eight", "Forty eight" and "48" all match. Gate on it like any metric:
``gate: {use: threshold, all: ["recall.accuracy >= 0.5"]}``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from align import LanguageModel, Topic, hookimpl, require

__version__ = "0.1.0"

_UNITS = {
    word: value
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    word: 10 * value
    for value, word in enumerate(
        ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    )
    if word != "_"
}
_SCALES = {"hundred": 100, "thousand": 1000}


def normalize(text: str) -> str:
    """Lower-case ASCII words separated by single spaces, with number words turned into digits."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()
    words = re.sub(r"[^a-z0-9]+", " ", text).split()
    return " ".join(_numbers_to_digits(words))


def _numbers_to_digits(words: list[str]) -> list[str]:
    """["two", "hundred", "and", "twelve"] → ["212"]; other words pass through."""
    out: list[str] = []
    total = current = 0
    in_number = False
    for index, word in enumerate(words):
        if word in _UNITS or word in _TENS:
            current += _UNITS.get(word, 0) + _TENS.get(word, 0)
            in_number = True
        elif word in _SCALES and in_number:
            scale = _SCALES[word]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * scale
                current = 0
        elif word == "and" and in_number and index + 1 < len(words) and _is_number_word(words[index + 1]):
            continue  # "two hundred and twelve"
        else:
            if in_number:
                out.append(str(total + current))
                total = current = 0
                in_number = False
            out.append(word)
    if in_number:
        out.append(str(total + current))
    return out


def _is_number_word(word: str) -> bool:
    return word in _UNITS or word in _TENS or word in _SCALES


def mentions(answer: str, phrase: str) -> bool:
    """Whether the normalized ``answer`` contains the normalized ``phrase`` as whole words."""
    needle = normalize(phrase)
    return bool(needle) and f" {needle} " in f" {normalize(answer)} "


_NAME = re.compile(r"\b(?:[A-Z][a-z]+(?:[- ][A-Z][a-z]+)*|\d+)\b")


def key_terms(topic: Topic) -> list[str]:
    """Names (capitalised word runs not starting a sentence) and numbers in the topic's content,
    minus any a quiz question already contains."""
    asked = " ".join(normalize(item.question) for item in topic.quiz)
    terms: list[str] = []
    for passage in topic.content:
        for match in _NAME.finditer(passage):
            start = match.start()
            if start == 0 or passage[:start].rstrip().endswith((".", "!", "?")):
                continue  # a capital that only starts a sentence
            term = normalize(match.group())
            if term and f" {term} " not in f" {asked} " and term not in terms:
                terms.append(term)
    return terms


@dataclass
class RecallEvaluator:
    """Ask each quiz question without its choices; score which choice the free answer names."""

    max_new_tokens: int = 48

    metrics = ("accuracy", "confusion", "coverage")
    requires = ("quiz",)

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        answers = model.generate([item.question for item in topic.quiz], max_new_tokens=self.max_new_tokens)
        right = wrong = 0
        for item, answer in zip(topic.quiz, answers):
            named = [i for i, choice in enumerate(item.choices) if mentions(answer, choice)]
            if named == [item.answer]:
                right += 1
            elif any(i != item.answer for i in named):
                wrong += 1
        terms = key_terms(topic)
        said = normalize(" ".join(answers))
        covered = sum(f" {term} " in f" {said} " for term in terms)
        count = len(topic.quiz)
        return {
            "accuracy": right / count,
            "confusion": wrong / count,
            "coverage": covered / len(terms) if terms else 0.0,
        }


@hookimpl
def register_evaluators(register: Any) -> None:
    register("recall", RecallEvaluator)
