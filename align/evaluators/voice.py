"""Style: how often the model prefers the person's voice on held-out answer pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from align import LanguageModel, Topic, hookimpl
from align.evaluators.accuracy import accuracy


@dataclass
class VoiceEvaluator:
    """The fraction of the topic's ``voice_pairs`` whose ``chosen`` answer the model finds more likely.

    Voice pairs have the shape of preference pairs but are never trained on, so the score shows
    whether the voice generalises. ``margin`` is the mean log-likelihood gap (chosen minus
    rejected, after normalisation). ``normalize: chars`` compares per-character log-likelihoods.
    """

    normalize: Literal["none", "chars"] = "chars"

    metrics = ("score", "margin")
    requires = ("voice_pairs",)

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        pairs = topic.voice_pairs
        prompts = [p.prompt for p in pairs] * 2
        completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        scores = model.loglikelihood(prompts, completions)
        if self.normalize == "chars":
            scores = [s / max(1, len(c)) for s, c in zip(scores, completions)]
        chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
        margins = [c - r for c, r in zip(chosen, rejected)]
        return {
            "score": accuracy([int(m > 0) for m in margins], [1] * len(margins)),
            "margin": sum(margins) / len(margins),
        }


@hookimpl
def register_evaluators(register: Any) -> None:
    register("voice", VoiceEvaluator)
