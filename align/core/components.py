"""The shapes of the things plugins contribute and the engine hands them.

These are protocols: a plugin's classes need not inherit from anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from align.core.topics import Topic


@runtime_checkable
class LanguageModel(Protocol):
    """What an evaluator may ask of a model."""

    def generate(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy completions of each prompt (the chat template applied where the model has one)."""
        ...

    def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Summed log-probability of each completion given its prompt, computed in batches."""
        ...


class Policy(Protocol):
    """What an objective may ask of the engine's model: the one rank-1 adapter it trains."""

    #: The PEFT model whose ``default`` adapter is trained. Objectives leave it with that adapter active.
    model: Any
    tokenizer: Any
    seed: int
    #: A directory the objective may use for scratch files; removed by nobody, lives inside the run.
    scratch_dir: Path

    @property
    def language_model(self) -> LanguageModel: ...

    def trainer_callbacks(self, step: str) -> list[Any]:
        """``transformers.TrainerCallback`` objects that forward progress and per-step logs to the run."""
        ...


class Objective(Protocol):
    def train(self, policy: Policy, topic: Topic) -> Mapping[str, float]: ...


class Evaluator(Protocol):
    def evaluate(self, model: LanguageModel, topic: Topic) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class GateDecision:
    """Whether a gated step runs, and why, in words a person reads in the run's summary."""

    passed: bool
    reason: str


class Gate(Protocol):
    def metrics_needed(self) -> Sequence[str]: ...

    def decide(self, metrics: Mapping[str, float]) -> GateDecision: ...


#: A component factory as passed to ``register(name, factory)``.
Factory = Callable[..., Any]
