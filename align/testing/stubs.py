"""Stand-ins for what a run uses, so a component is tested in milliseconds with no torch model:
``StubModel`` for a language model, ``StubPolicy`` for the engine's model, ``StubObjective`` for
training, ``StubEvaluator`` for scoring and ``StubPlugin`` for a plugin built from mappings."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from align.core.topics import Topic
from align.plugins.hookspecs import hookimpl

Generate = Callable[[str], str] | Mapping[str, str] | None

Loglikelihood = Callable[[str, str], float] | Mapping[Any, float] | None


class StubModel:
    """A :class:`align.LanguageModel` whose answers you choose.

    ``generate`` is a function of the prompt or a mapping prompt → text (default: ``""``).
    ``loglikelihood`` is a function of ``(prompt, completion)`` or a mapping whose keys are
    ``(prompt, completion)`` tuples or completions (default: ``0.0``). Every call is recorded in
    ``calls`` as ``(method, arguments)``.
    """

    def __init__(self, generate: Generate = None, loglikelihood: Loglikelihood = None):
        self._generate = generate
        self._loglikelihood = loglikelihood
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def generate(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        self.calls.append(("generate", (list(prompts), max_new_tokens)))
        return [self._answer(prompt) for prompt in prompts]

    def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        self.calls.append(("loglikelihood", (list(prompts), list(completions))))
        return [float(self._score(p, c)) for p, c in zip(prompts, completions)]

    def _answer(self, prompt: str) -> str:
        if self._generate is None:
            return ""
        if callable(self._generate):
            return self._generate(prompt)
        if prompt not in self._generate:
            raise KeyError(f"StubModel has no generation for prompt {prompt!r}")
        return self._generate[prompt]

    def _score(self, prompt: str, completion: str) -> float:
        if self._loglikelihood is None:
            return 0.0
        if callable(self._loglikelihood):
            return self._loglikelihood(prompt, completion)
        for key in ((prompt, completion), completion):
            if key in self._loglikelihood:
                return self._loglikelihood[key]
        raise KeyError(f"StubModel has no log-likelihood for completion {completion!r} of prompt {prompt!r}")


class StubPolicy:
    """Stands in for the engine's model: evaluators see ``language_model``; adapters are JSON files.

    ``state`` is a dict standing in for the adapter's weights: a :class:`StubObjective` changes it,
    a :class:`StubModel` built on a function can read it, and the engine's ``snapshot``/``restore``
    (used by rollback guards) copy it and put it back in place.
    """

    def __init__(
        self,
        language_model: Any = None,
        seed: int = 0,
        scratch_dir: Path | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.model = None
        self.tokenizer = None
        self.seed = seed
        self.scratch_dir = scratch_dir or Path(".")
        self.language_model = language_model if language_model is not None else StubModel()
        self.state = state if state is not None else {}
        self.saved: list[Path] = []

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def restore(self, state: dict[str, Any]) -> None:
        self.state.clear()
        self.state.update(copy.deepcopy(state))

    def save_snapshot(self, state: dict[str, Any], path: Path) -> Path:
        """Write a :meth:`snapshot` for the engine's checkpoints (JSON here; safetensors for a real model)."""
        from align.core.rundir import atomic_write_text

        target = Path(path).with_suffix(".json")
        atomic_write_text(target, json.dumps(state))
        return target

    def load_snapshot(self, path: Path) -> dict[str, Any]:
        return json.loads(Path(path).read_text())

    def set_log_target(
        self, on_log: Callable[[str, dict[str, float]], None] | None, topic: str | None = None
    ) -> None:
        """Where :meth:`log` sends trainer logs (the engine: metrics.jsonl and ``on_trainer_log``)."""
        self._on_log = on_log

    def set_recorder(self, recorder: Callable[[str, dict[str, Any]], None] | None) -> None:
        """Where events recorded through the policy would go; a stub has none to record (it has
        no ``record``, so components that record through a real policy record nothing here)."""
        self._recorder = recorder

    def reseed(self, offset: int) -> None:
        """Nothing to seed: a stub draws no random numbers."""

    def log(self, step: str, logs: dict[str, float]) -> None:
        """What a real trainer does after an optimizer step: a stub objective's ``effect`` may call
        it to test an ``on_trainer_log`` hook without a model."""
        if getattr(self, "_on_log", None) is not None:
            self._on_log(step, dict(logs))

    def trainer_callbacks(self, step: str) -> list[Any]:
        return []

    def trainer_args(self) -> dict[str, Any]:
        return {}

    def save_adapter(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"saved": len(self.saved) + 1, "state": self.state}
        (directory / "stub_adapter.json").write_text(json.dumps(payload, default=repr))
        self.saved.append(directory)


class StubObjective:
    """An objective that trains nothing: it calls ``effect(policy, topic)`` and returns ``metrics``.

    ``metrics`` is a mapping or a function of the topic. Each call's topic name is kept in ``calls``.
    """

    def __init__(
        self,
        metrics: Mapping[str, float] | Callable[[Topic], Mapping[str, float]] | None = None,
        effect: Callable[[Any, Topic], None] | None = None,
    ):
        self._metrics = metrics if metrics is not None else {"loss": 0.0}
        self.effect = effect
        self.calls: list[str] = []

    def train(self, policy: Any, topic: Topic) -> dict[str, float]:
        self.calls.append(topic.name)
        if self.effect is not None:
            self.effect(policy, topic)
        return dict(self._metrics(topic) if callable(self._metrics) else self._metrics)


class StubEvaluator:
    """An evaluator returning ``metrics``: a mapping, or a function of ``(model, topic)``."""

    def __init__(self, metrics: Mapping[str, float] | Callable[[Any, Topic], Mapping[str, float]]):
        self._metrics = metrics
        self.calls: list[str] = []

    def evaluate(self, model: Any, topic: Topic) -> dict[str, float]:
        self.calls.append(topic.name)
        return dict(self._metrics(model, topic) if callable(self._metrics) else self._metrics)


def _as_factory(component: Any) -> Callable[..., Any]:
    """A class or factory stays as it is; a ready-made instance becomes ``lambda: instance``."""
    if isinstance(component, type) or not any(
        hasattr(component, method) for method in ("train", "evaluate", "decide")
    ):
        return component
    return lambda: component


class StubPlugin:
    """A plugin object from plain mappings of name → factory (or ready-made component instance).

    ``StubPlugin(objectives={"sft": StubObjective()}, evaluators={"quiz": QuizEvaluator})``
    """

    def __init__(
        self,
        objectives: Mapping[str, Any] | None = None,
        evaluators: Mapping[str, Any] | None = None,
        gates: Mapping[str, Any] | None = None,
    ):
        self.objectives = dict(objectives or {})
        self.evaluators = dict(evaluators or {})
        self.gates = dict(gates or {})

    @hookimpl
    def register_objectives(self, register: Callable[..., None]) -> None:
        for name, component in self.objectives.items():
            register(name, _as_factory(component))

    @hookimpl
    def register_evaluators(self, register: Callable[..., None]) -> None:
        for name, component in self.evaluators.items():
            register(name, _as_factory(component))

    @hookimpl
    def register_gates(self, register: Callable[..., None]) -> None:
        for name, component in self.gates.items():
            register(name, _as_factory(component))
