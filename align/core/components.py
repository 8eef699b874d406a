"""The shapes of the things plugins contribute and the engine hands them.

These are protocols: a plugin's classes need not inherit from anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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


class TrainingPolicy(Policy, Protocol):
    """What the engine asks of its model beyond what an objective sees: the adapter's weights to
    take and put back (rollback guards, failed steps), to write (checkpoints, the adapter of each
    topic), and where the run's events go. ``align.core.model.EnginePolicy`` is the real one,
    ``align.testing.StubPolicy`` the stand-in."""

    def snapshot(self) -> Any:
        """The adapter's weights as they are now (a copy)."""
        ...

    def restore(self, state: Any) -> None:
        """Put back weights a :meth:`snapshot` took."""
        ...

    def save_snapshot(self, state: Any, path: Path) -> Path:
        """Write a :meth:`snapshot` for a checkpoint near ``path``; returns the file written."""
        ...

    def load_snapshot(self, path: Path) -> Any: ...

    def save_adapter(self, directory: Path) -> None:
        """Save the adapter as it is now into ``directory`` (a topic's adapter)."""
        ...

    def set_recorder(self, recorder: Callable[[str, dict[str, Any]], None] | None) -> None:
        """Where events a component records through the policy go (the run's ``metrics.jsonl``)."""
        ...

    def set_log_target(
        self, on_log: Callable[[str, dict[str, float]], None] | None, topic: str | None = None
    ) -> None:
        """Where trainer logs go (the engine points this at the topic in progress)."""
        ...

    def reseed(self, offset: int) -> None:
        """Seed the random generators with ``seed + offset`` (before each step, resumed or not)."""
        ...


@dataclass(frozen=True)
class GateDecision:
    """Whether a gated step runs, and why, in words a person reads in the run's summary."""

    passed: bool
    reason: str


#: A component factory as passed to ``register(name, factory)``.
Factory = Callable[..., Any]
