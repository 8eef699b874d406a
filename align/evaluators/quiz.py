"""Knowledge: multiple-choice quiz accuracy, scored by the model's likelihood of each choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from align import LanguageModel, Topic, hookimpl
from align.evaluators.accuracy import accuracy


@dataclass(frozen=True)
class QuestionScore:
    """One quiz question as the model answers it: the index of the right choice, the index of the
    choice it finds most likely, and ``margin``, the right choice's score minus the best wrong one's
    (positive when it answers right; per character with ``normalize: chars``)."""

    question: str
    answer: int
    picked: int
    margin: float


@dataclass
class QuizEvaluator:
    """The fraction of quiz questions whose right choice the model finds most likely.

    Each question is the prompt and each choice a completion; all choices of all questions are
    scored in one batched ``loglikelihood`` call. ``normalize: chars`` divides each choice's
    log-likelihood by its length in characters, so long choices are not penalised for length.

    ``margin`` is the mean, over questions, of the right choice's score minus the best wrong
    choice's (per character with ``normalize: chars``): positive when the right answer wins. It
    moves continuously where ``accuracy`` moves in steps of one question, so it shows an answer
    weakening (forgetting) before it flips.
    """

    normalize: Literal["none", "chars"] = "chars"

    metrics = ("accuracy", "margin")
    requires = ("quiz",)
    #: The same weights and data give the same metrics: the engine reuses them (align.core.reuse).
    cacheable = True

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        scored = self.score_questions(model, topic)
        return {
            "accuracy": accuracy([item.picked for item in scored], [item.answer for item in scored]),
            "margin": sum(item.margin for item in scored) / len(scored),
        }

    def score_questions(self, model: LanguageModel, topic: Topic) -> list[QuestionScore]:
        """Each quiz question's right choice, the choice the model picks and the margin between
        them, as :meth:`evaluate` scores them (what ``align questions`` prints)."""
        prompts = [item.question for item in topic.quiz for _ in item.choices]
        completions = [choice for item in topic.quiz for choice in item.choices]
        scores = model.loglikelihood(prompts, completions)
        scored, start = [], 0
        for item in topic.quiz:
            item_scores = scores[start : start + len(item.choices)]
            if self.normalize == "chars":
                item_scores = [s / max(1, len(c)) for s, c in zip(item_scores, item.choices)]
            wrong = [s for i, s in enumerate(item_scores) if i != item.answer]
            scored.append(
                QuestionScore(
                    question=item.question,
                    answer=item.answer,
                    picked=max(range(len(item_scores)), key=item_scores.__getitem__),
                    margin=item_scores[item.answer] - max(wrong) if wrong else 0.0,
                )
            )
            start += len(item.choices)
        return scored


@hookimpl
def register_evaluators(register: Any) -> None:
    register("quiz", QuizEvaluator)
