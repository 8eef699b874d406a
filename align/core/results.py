"""What a run produced: a step's result, a topic's, and the forgetting matrix's ACC and BWT.

The engine builds these as it goes; ``summary.json`` and the checkpoint hold them as dicts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    name: str
    kind: str
    status: str  # "ran", "skipped" or "failed"
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    seconds: float = 0.0
    #: Set when this step's guard restored the adapter: ``step``, ``reason`` and ``metrics`` (the
    #: values from before the rolled-back step, which hold again now).
    rollback: dict[str, Any] | None = None
    #: Set when the step failed: ``plugin``, ``component``, ``reason``.
    error: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.name, "kind": self.kind, "status": self.status}
        if self.gate is not None:
            data["gate"] = self.gate
        data["metrics"] = self.metrics
        if self.rollback is not None:
            data["rollback"] = self.rollback
        if self.error is not None:
            data["error"] = self.error
        data["seconds"] = round(self.seconds, 3)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        """The inverse of :meth:`as_dict` (a checkpoint stores results this way)."""
        return cls(
            name=data["step"],
            kind=data["kind"],
            status=data["status"],
            metrics=dict(data.get("metrics", {})),
            gate=data.get("gate"),
            seconds=float(data.get("seconds", 0.0)),
            rollback=data.get("rollback"),
            error=data.get("error"),
        )


@dataclass
class TopicResult:
    name: str
    steps: list[StepResult] = field(default_factory=list)
    adapter: str | None = None
    #: Earlier topic → its metrics measured again after this topic (``recheck: earlier``).
    recheck: dict[str, dict[str, float]] = field(default_factory=dict)
    recheck_seconds: float = 0.0

    def latest(self) -> dict[str, float]:
        """The latest value of every metric recorded so far for this topic (what gates read)."""
        metrics: dict[str, float] = {}
        for step in self.steps:
            metrics.update(step.metrics)
            if step.rollback is not None:
                metrics.update(step.rollback["metrics"])
        return metrics

    def ran(self, step_name: str) -> bool:
        return any(s.name == step_name and s.status == "ran" for s in self.steps)

    def evaluated(self, prefixes: Collection[str]) -> dict[str, float]:
        """The latest value of each metric of the evaluators named ``prefixes``: what the topic's
        own evaluation steps last measured (or what a rollback restored)."""
        metrics: dict[str, float] = {}
        for step in self.steps:
            if step.kind == "eval" and step.status == "ran":
                metrics.update(step.metrics)
            if step.rollback is not None:
                metrics.update(step.rollback["metrics"])
        return {name: value for name, value in metrics.items() if name.split(".")[0] in prefixes}

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "topic": self.name,
            "adapter": self.adapter,
            "steps": [s.as_dict() for s in self.steps],
        }
        if self.recheck:
            data["recheck"] = self.recheck
            data["recheck_seconds"] = round(self.recheck_seconds, 3)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopicResult:
        recheck = {target: dict(metrics) for target, metrics in data.get("recheck", {}).items()}
        return cls(
            data["topic"],
            [StepResult.from_dict(s) for s in data["steps"]],
            data.get("adapter"),
            recheck,
            float(data.get("recheck_seconds", 0.0)),
        )


def retention_scores(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """ACC and BWT of a forgetting matrix (``M[i][j]``: topic ``j`` right after topic ``i``).

    ``acc``: the mean over the topics trained so far of their value now (the last row). ``bwt``
    (backward transfer): the mean over the earlier topics of their value now minus their value
    right after their own training (``M[last][j] - M[j][j]``); negative is forgetting, ``None``
    before a second topic. Values not measured are left out of either mean.
    """
    if not matrix:
        return {"acc": None, "bwt": None}
    last = len(matrix) - 1
    now = [value for value in matrix[last][: last + 1] if value is not None]
    changes = [
        matrix[last][j] - matrix[j][j]
        for j in range(last)
        if matrix[last][j] is not None and matrix[j][j] is not None
    ]
    return {
        "acc": sum(now) / len(now) if now else None,
        "bwt": sum(changes) / len(changes) if changes else None,
    }


def forgetting_matrix(
    names: list[str], results: list[TopicResult], prefixes: Collection[str]
) -> dict[str, Any]:
    """``summary["forgetting"]`` of the run's topics ``names`` after the finished ``results``:
    per metric of the evaluators ``prefixes``, ``M[i][j]`` is topic ``j``'s value right after
    topic ``i`` was trained (``j < i``: a recheck; ``j == i``: topic ``i``'s own last
    evaluation), ``None`` for ``j > i`` or a value not measured; a row per finished topic."""
    rows = [{**result.recheck, result.name: result.evaluated(prefixes)} for result in results]
    metric_names: dict[str, None] = {}  # ordered, and a set: a list's membership test is quadratic
    for row in rows:
        for metrics in row.values():
            metric_names.update(dict.fromkeys(metrics))
    matrix = {
        metric: [
            [row.get(name, {}).get(metric) if j <= i else None for j, name in enumerate(names)]
            for i, row in enumerate(rows)
        ]
        for metric in metric_names
    }
    retention = {metric: retention_scores(m) for metric, m in matrix.items()}
    return {
        "topics": names,
        "metrics": matrix,
        "acc": {metric: r["acc"] for metric, r in retention.items()},
        "bwt": {metric: r["bwt"] for metric, r in retention.items()},
    }
