"""Style: how the model talks, from answers it generates to the held-out voice prompts.

The ``voice`` evaluator ranks log-likelihoods of answers someone wrote; this one reads what the
model says. It answers each held-out voice prompt (greedy), then compares each answer with the
person's own answers and with the plain ones by character n-gram TF-IDF cosine similarity, a
training-free authorship-verification method that needs no downloaded model: character 3-5-grams
catch a person's words, phrases, punctuation and turns of speech, whatever the topic.

- ``score``: the fraction of answers closer to the person's answers (the ``chosen`` side of the
  voice pairs, as one profile) than to the plain ones (the ``rejected`` side), counting only
  answers that are not degenerate (below).
- ``similarity``: the mean of that difference of cosine similarities (-1..1; > 0 leans to the person).
- ``repetition``: the fraction of degenerate answers, which a likelihood score never shows: an
  answer that loops (a word or phrase said three times in a row, or one three-word phrase making
  up a third of the answer), or one that is, word for word, the answer to another prompt (a model
  that says its catchphrase whatever it is asked sounds like the person and says nothing).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from align import LanguageModel, Topic, hookimpl, require
from align.evaluators.voice import scored_pairs


def char_ngrams(text: str, low: int = 3, high: int = 5) -> Counter[str]:
    """Counts of the character ``low``..``high``-grams of ``text``, lower-cased, spaces collapsed."""
    text = " " + re.sub(r"\s+", " ", text.lower()).strip() + " "
    grams: Counter[str] = Counter()
    for n in range(low, high + 1):
        grams.update(text[i : i + n] for i in range(len(text) - n + 1))
    return grams


class TfidfSpace:
    """TF-IDF weights fitted on reference texts (smoothed idf, sub-linear tf, unit length)."""

    def __init__(self, documents: Sequence[str], low: int = 3, high: int = 5):
        self.low, self.high = low, high
        counts = [char_ngrams(doc, low, high) for doc in documents]
        frequency: Counter[str] = Counter()
        for grams in counts:
            frequency.update(grams.keys())
        total = len(documents)
        self.idf = {gram: math.log((1 + total) / (1 + df)) + 1 for gram, df in frequency.items()}
        self._unseen = math.log(1 + total) + 1  # an n-gram no reference text has

    def vector(self, text: str) -> dict[str, float]:
        weights = {
            gram: (1 + math.log(count)) * self.idf.get(gram, self._unseen)
            for gram, count in char_ngrams(text, self.low, self.high).items()
        }
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {gram: w / norm for gram, w in weights.items()}

    def centroid(self, texts: Iterable[str]) -> dict[str, float]:
        """The unit-length mean of the texts' vectors: a profile of how they are written."""
        total: Counter[str] = Counter()
        for text in texts:
            total.update(self.vector(text))
        norm = math.sqrt(sum(w * w for w in total.values())) or 1.0
        return {gram: w / norm for gram, w in total.items()}


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    """Cosine similarity of two unit-length sparse vectors."""
    if len(a) > len(b):
        a, b = b, a
    return sum(w * b.get(gram, 0.0) for gram, w in a.items())


def repeats(text: str) -> bool:
    """Whether ``text`` loops: a word or a phrase of up to four words three times in a row, or one
    three-word phrase making up a third or more of a long answer."""
    words = re.findall(r"[\w']+", text.lower())
    for n in range(1, 5):
        for start in range(len(words) - 3 * n + 1):
            chunk = words[start : start + n]
            if chunk == words[start + n : start + 2 * n] == words[start + 2 * n : start + 3 * n]:
                return True
    trigrams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return len(words) >= 12 and bool(trigrams) and 3 * trigrams.most_common(1)[0][1] * 3 >= len(words)


@dataclass
class StyleEvaluator:
    """Does what the model says sound like the person? See the module's docstring."""

    max_new_tokens: int = 64
    ngram_min: int = 3
    ngram_max: int = 5

    metrics = ("score", "similarity", "repetition")
    requires = ("voice_pairs",)
    #: The same weights and data give the same metrics: the engine reuses them (align.core.reuse).
    cacheable = True
    #: Generating is slower than scoring: rechecks of earlier topics leave this evaluator out
    #: (with ``voice_set: person`` every topic has the same voice prompts anyway).
    recheck = False

    def __post_init__(self) -> None:
        require(1 <= self.max_new_tokens <= 4096, "max_new_tokens", "must be between 1 and 4096")
        require(
            1 <= self.ngram_min <= self.ngram_max <= 10,
            "ngram_min",
            "needs 1 <= ngram_min <= ngram_max <= 10",
        )

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        pairs = scored_pairs(topic, "style")
        answers = model.generate([pair.prompt for pair in pairs], max_new_tokens=self.max_new_tokens)
        return style_scores(
            answers, [p.chosen for p in pairs], [p.rejected for p in pairs], self.ngram_min, self.ngram_max
        )


def style_scores(
    answers: Sequence[str], person: Sequence[str], plain: Sequence[str], low: int = 3, high: int = 5
) -> dict[str, float]:
    """The ``style`` metrics of generated ``answers`` against the ``person``'s and ``plain`` answers."""
    space = TfidfSpace([*person, *plain], low, high)
    person_profile, plain_profile = space.centroid(person), space.centroid(plain)
    differences = []
    for answer in answers:
        vector = space.vector(answer)
        differences.append(cosine(vector, person_profile) - cosine(vector, plain_profile))
    said = Counter(" ".join(answer.lower().split()) for answer in answers)
    degenerate = [repeats(answer) or said[" ".join(answer.lower().split())] > 1 for answer in answers]
    count = max(1, len(answers))
    return {
        "score": sum(1 for d, bad in zip(differences, degenerate) if d > 0 and not bad) / count,
        "similarity": sum(differences) / count,
        "repetition": sum(degenerate) / count,
    }


@hookimpl
def register_evaluators(register: Any) -> None:
    register("style", StyleEvaluator)
