"""Evaluations the engine does not repeat: the same evaluator, on the same data, with the same
adapter weights, gives the same metrics.

A run evaluates the same thing more than once. With ``voice_set: person`` every topic is scored
on the person's voice pairs, so a topic's ``before`` step scores the voice with exactly the
adapter the previous topic's last step scored it with; a recheck of earlier topics scores it again
for each of them; a rollback puts back weights an earlier step already evaluated. An evaluator
whose class says ``cacheable = True`` (the built-in ``quiz``, ``voice`` and ``style``: inference
mode, greedy generation, no randomness) is run once per distinct key and its metrics reused:

- the evaluator's name and its settings (``repr`` of a dataclass instance);
- the topic fields it ``requires`` (the whole topic if it declares none), not the topic's name,
  so the person's voice set scored for two topics is one evaluation;
- the policy's ``fingerprint()``: a digest of the adapter's weights. A policy without one, or one
  that returns ``None`` (a multi-process launch, where every process must make the same passes),
  turns reuse off.

Third-party evaluators are never reused unless they opt in. Reuse changes no metric: the reused
value is what the evaluator returned for the same key, bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from align.core.topics import Topic

TOPIC_FIELDS = ("content", "quiz", "preference_pairs", "voice_pairs")


def topic_key(topic: Topic, requires: Any) -> str:
    """The parts of ``topic`` an evaluator that reads ``requires`` can see, as text."""
    fields = [name for name in requires if name in TOPIC_FIELDS] if requires else [*TOPIC_FIELDS, "name"]
    return "\n".join(f"{name}={getattr(topic, name)!r}" for name in fields)


class Evaluations:
    """Metrics of cacheable evaluations, by key (see the module's docstring)."""

    def __init__(self) -> None:
        self._stored: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    @staticmethod
    def weights(policy: Any, components: Sequence[Any]) -> str | None:
        """The policy's fingerprint of its weights, taken once for the evaluations about to run
        with them, or ``None`` when none of ``components`` is cacheable or the policy has none."""
        fingerprint = getattr(policy, "fingerprint", None)
        if not callable(fingerprint) or not any(getattr(c.instance, "cacheable", False) for c in components):
            return None
        return fingerprint()

    def key(
        self, name: str, instance: Any, topic: Topic, weights: str | None
    ) -> tuple[str, str, str, str] | None:
        """The key of evaluating ``topic`` with ``instance`` on the weights whose fingerprint is
        ``weights`` (:meth:`weights`), or ``None`` when this evaluation is not to be reused."""
        if weights is None or not getattr(instance, "cacheable", False):
            return None
        data = hashlib.sha256(topic_key(topic, getattr(instance, "requires", None)).encode()).hexdigest()
        return name, repr(instance), data, str(weights)

    def get(self, key: tuple[str, str, str, str] | None) -> dict[str, Any] | None:
        if key is None or key not in self._stored:
            return None
        return dict(self._stored[key])

    def put(self, key: tuple[str, str, str, str] | None, metrics: Mapping[str, Any]) -> None:
        if key is not None and isinstance(metrics, Mapping):
            self._stored[key] = dict(metrics)
