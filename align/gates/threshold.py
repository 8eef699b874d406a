"""The threshold gate: run a step only when recorded metrics meet their thresholds.

Rules are data, never evaluated code: ``"quiz.accuracy >= 0.70"`` is parsed by a strict pattern
(metric name, one of ``>= > <= <``, a number), or written as ``{metric, op, value}``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from align import GateDecision, ParamError, hookimpl

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NEGATED = {">=": "<", ">": "<=", "<=": ">", "<": ">="}
_RULE = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str
    value: float

    def holds(self, metrics: Mapping[str, float]) -> bool:
        return OPERATORS[self.op](metrics[self.metric], self.value)

    def describe(self, metrics: Mapping[str, float]) -> str:
        actual = metrics[self.metric]
        op = self.op if self.holds(metrics) else _NEGATED[self.op]
        return f"{self.metric} {actual:.2f} {op} {self.value:.2f}"


def parse_rule(rule: Any, key: str) -> Rule:
    """A rule from ``"metric op number"`` or ``{metric, op, value}``."""
    if isinstance(rule, str):
        match = _RULE.match(rule)
        if not match:
            raise ParamError(
                key,
                f"cannot read rule {rule!r}; write it as 'metric op number', e.g. 'quiz.accuracy >= 0.70'",
            )
        return Rule(match.group(1), match.group(2), float(match.group(3)))
    if isinstance(rule, Mapping):
        if set(rule) != {"metric", "op", "value"}:
            raise ParamError(
                key, f"a rule mapping needs exactly the keys metric, op, value (got {sorted(rule)})"
            )
        if rule["op"] not in OPERATORS:
            raise ParamError(key, f"unknown op {rule['op']!r}; use one of {', '.join(OPERATORS)}")
        value = rule["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(key, f"value must be a number (got {value!r})")
        return Rule(str(rule["metric"]), rule["op"], float(value))
    raise ParamError(key, f"a rule is a string like 'quiz.accuracy >= 0.70' or a mapping (got {rule!r})")


@dataclass
class ThresholdGate:
    """Passes when every rule in ``all`` holds and, if ``any`` is given, at least one of its rules does."""

    all: list[Any] = field(default_factory=list)
    any: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._all = [parse_rule(r, f"all[{i}]") for i, r in enumerate(self.all)]
        self._any = [parse_rule(r, f"any[{i}]") for i, r in enumerate(self.any)]
        if not self._all and not self._any:
            raise ParamError("all", "the threshold gate needs at least one rule in 'all' or 'any'")

    def metrics_needed(self) -> list[str]:
        return sorted({rule.metric for rule in self._all + self._any})

    @property
    def rules(self) -> list[Rule]:
        """Every rule, ``all``'s then ``any``'s (``align validate`` says what each means in questions)."""
        return self._all + self._any

    def decide(self, metrics: Mapping[str, float]) -> GateDecision:
        failed = [rule for rule in self._all if not rule.holds(metrics)]
        any_ok = not self._any or any(rule.holds(metrics) for rule in self._any)
        if not failed and any_ok:
            shown = self._all + [rule for rule in self._any if rule.holds(metrics)][:1]
            return GateDecision(True, " and ".join(rule.describe(metrics) for rule in shown))
        reasons = [rule.describe(metrics) for rule in failed]
        if not any_ok:
            reasons.append("none of: " + " or ".join(rule.describe(metrics) for rule in self._any))
        return GateDecision(False, " and ".join(reasons))


@hookimpl
def register_gates(register: Any) -> None:
    register("threshold", ThresholdGate)
