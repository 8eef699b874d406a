"""The engine: runs a plan's protocol over its topics with one model and one rank-1 adapter.

The engine knows no objective, evaluator or gate by name; everything it runs came from the
registry through the plan. Each event is appended to ``metrics.jsonl`` as it happens, the
summary is rewritten after every topic, and the adapter is saved after every topic, so a crash
loses at most the topic in progress.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from align.core.components import GateDecision
from align.core.plan import Plan, Step
from align.core.rundir import RunDir
from align.core.topics import Topic
from align.errors import AlignError


@dataclass
class StepResult:
    name: str
    kind: str
    status: str  # "ran" or "skipped"
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.name, "kind": self.kind, "status": self.status}
        if self.gate is not None:
            data["gate"] = self.gate
        data["metrics"] = self.metrics
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass
class TopicResult:
    name: str
    steps: list[StepResult] = field(default_factory=list)
    adapter: str | None = None

    def latest(self) -> dict[str, float]:
        """The latest value of every metric recorded so far for this topic (what gates read)."""
        metrics: dict[str, float] = {}
        for step in self.steps:
            metrics.update(step.metrics)
        return metrics

    def ran(self, step_name: str) -> bool:
        return any(s.name == step_name and s.status == "ran" for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.name, "adapter": self.adapter, "steps": [s.as_dict() for s in self.steps]}


class Reporter:
    """Where the engine says what it is doing. The base class says nothing."""

    def run_start(self, plan: Plan, output: str) -> None: ...
    def topic_start(self, index: int, total: int, topic: Topic) -> None: ...
    def step_log(self, step: str, logs: Mapping[str, float]) -> None: ...
    def step_end(self, topic: Topic, result: StepResult) -> None: ...
    def run_end(self, summary: Mapping[str, Any]) -> None: ...


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _prefixed(name: str, metrics: Mapping[str, Any], where: str) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{where} returned {type(metrics).__name__}, expected a mapping of metric name to number"
        )
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} returned {key}={value!r}; metric values must be numbers")
        flat[f"{name}.{key}"] = float(value)
    return flat


class Engine:
    """Runs ``plan`` with ``policy`` (the model and its adapter), writing into ``rundir``."""

    def __init__(
        self,
        plan: Plan,
        policy: Any,
        rundir: RunDir,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.perf_counter,
        environment: Mapping[str, str] | None = None,
    ):
        self.plan = plan
        self.policy = policy
        self.rundir = rundir
        self.reporter = reporter or Reporter()
        self.clock = clock
        self.environment = dict(environment or {})
        self.results: list[TopicResult] = []
        self.status = "running"
        self._started = _now()
        self._start_clock = clock()

    # -- events -------------------------------------------------------------------------------
    def _record(self, topic: str, step: str, kind: str, metrics: Mapping[str, float], **extra: Any) -> None:
        event = {
            "time": _now(),
            "topic": topic,
            "step": step,
            "kind": kind,
            "metrics": dict(metrics),
            **extra,
        }
        self.rundir.record(event)

    def on_trainer_log(self, topic: str) -> Callable[[str, dict[str, float]], None]:
        def forward(step: str, logs: dict[str, float]) -> None:
            self._record(topic, step, "log", {k: v for k, v in logs.items() if math.isfinite(v)})
            self.reporter.step_log(step, logs)

        return forward

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.reporter.run_start(self.plan, str(self.rundir.path))
        try:
            for index, topic in enumerate(self.plan.topics):
                self.reporter.topic_start(index, len(self.plan.topics), topic)
                self.results.append(self.run_topic(topic))
                self.rundir.write_summary(self.summary())
            self.status = "completed"
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except BaseException:
            self.status = "failed"
            raise
        finally:
            summary = self.summary()
            self.rundir.write_summary(summary)
            self.rundir.close()
        self.reporter.run_end(summary)
        return summary

    def run_topic(self, topic: Topic) -> TopicResult:
        result = TopicResult(topic.name)
        if hasattr(self.policy, "set_log_target"):
            self.policy.set_log_target(self.on_trainer_log(topic.name))
        for step in self.plan.steps:
            step_result = self.run_step(step, topic, result)
            result.steps.append(step_result)
            self.reporter.step_end(topic, step_result)
        adapter_dir = self.rundir.adapter_dir(topic.name)
        self.policy.save_adapter(adapter_dir)
        result.adapter = str(adapter_dir.relative_to(self.rundir.path))
        return result

    def run_step(self, step: Step, topic: Topic, so_far: TopicResult) -> StepResult:
        kind = "train" if step.kind == "train" else "eval"
        if step.if_ran is not None and not so_far.ran(step.if_ran):
            reason = f"step '{step.if_ran}' did not run"
            self._record(topic.name, step.name, "skip", {}, reason=reason)
            return StepResult(step.name, kind, "skipped", gate={"passed": False, "reason": reason})
        gate_record = None
        if step.gate is not None:
            decision = self.decide(step, so_far.latest())
            gate_record = {"gate": step.gate.name, "passed": decision.passed, "reason": decision.reason}
            self._record(topic.name, step.name, "gate", {}, passed=decision.passed, reason=decision.reason)
            if not decision.passed:
                return StepResult(step.name, kind, "skipped", gate=gate_record)
        started = self.clock()
        metrics: dict[str, float] = {}
        for component in step.components:
            if step.kind == "train":
                raw = component.instance.train(self.policy, topic)
                where = f"objective '{component.name}'"
            else:
                raw = component.instance.evaluate(self.policy.language_model, topic)
                where = f"evaluator '{component.name}'"
            metrics.update(_prefixed(component.name, raw, where))
        self._record(topic.name, step.name, kind, metrics)
        return StepResult(step.name, kind, "ran", metrics, gate_record, self.clock() - started)

    def decide(self, step: Step, metrics: Mapping[str, float]) -> GateDecision:
        assert step.gate is not None
        missing = [m for m in step.gate.instance.metrics_needed() if m not in metrics]
        if missing:
            raise AlignError(
                f"step '{step.name}': gate '{step.gate.name}' needs {', '.join(missing)}, which no earlier step "
                f"recorded for this topic (recorded: {', '.join(sorted(metrics)) or 'none'})"
            )
        decision = step.gate.instance.decide(metrics)
        if not isinstance(decision, GateDecision):
            raise TypeError(f"gate '{step.gate.name}' returned {decision!r}, expected align.GateDecision")
        return decision

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "started": self._started,
            "seconds": round(self.clock() - self._start_clock, 3),
            "output": str(self.rundir.path),
            "seed": self.plan.config.get("seed"),
            "environment": self.environment,
            "steps": [step.name for step in self.plan.steps],
            "topics": [result.as_dict() for result in self.results],
        }
