"""Style: how often the model prefers the person's voice on held-out answer pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from align import AlignError, LanguageModel, PreferencePair, Topic, hookimpl
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
    #: The same weights and data give the same metrics: the engine reuses them (align.core.reuse).
    cacheable = True

    def evaluate(self, model: LanguageModel, topic: Topic) -> dict[str, float]:
        pairs = scored_pairs(topic, "voice")
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


def scored_pairs(topic: Topic, evaluator: str) -> tuple[PreferencePair, ...]:
    """The topic's voice pairs that have a ``rejected`` answer to compare with (``align run`` gives
    the others the bare model's own answers before training; outside a run they are left out)."""
    pairs = tuple(pair for pair in topic.voice_pairs if pair.rejected is not None)
    if not pairs:
        raise AlignError(
            f"{topic.source}: voice_pairs: none has a rejected answer, which evaluator '{evaluator}' compares "
            "with; `align run` generates them from the bare model (its topics.json records them): "
            "evaluate with the run's topics, or give rejected answers"
        )
    return pairs
