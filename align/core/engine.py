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
    #: Set when this step's guard restored the adapter: ``step``, ``reason`` and ``metrics`` (the
    #: values from before the rolled-back step, which hold again now).
    rollback: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.name, "kind": self.kind, "status": self.status}
        if self.gate is not None:
            data["gate"] = self.gate
        data["metrics"] = self.metrics
        if self.rollback is not None:
            data["rollback"] = self.rollback
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
            if step.rollback is not None:
                metrics.update(step.rollback["metrics"])
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
    def warning(self, message: str) -> None: ...


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
        hooks: Any = None,
    ):
        self.plan = plan
        #: The plugin manager whose lifecycle hooks (``on_run_start`` …) watch the run, if any.
        self.hooks = hooks
        self.policy = policy
        self.rundir = rundir
        self.reporter = reporter or Reporter()
        self.clock = clock
        self.environment = dict(environment or {})
        self.results: list[TopicResult] = []
        self.status = "running"
        self._started = _now()
        self._start_clock = clock()
        self._current_topic: str | None = None
        # Training steps a later step may roll back: the adapter and metrics from before each.
        self._guarded = {step.rollback.step for step in plan.steps if step.rollback is not None}
        self._snapshots: dict[str, tuple[Any, dict[str, float]]] = {}

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

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook's implementations one by one; one that raises is reported, not fatal."""
        if self.hooks is None:
            return
        for impl in reversed(getattr(self.hooks.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as exc:
                message = f"plugin '{impl.plugin_name}' raised in {hook_name}: {type(exc).__name__}: {exc}"
                self._record(
                    self._current_topic or "",
                    "",
                    "hook_error",
                    {},
                    plugin=impl.plugin_name,
                    hook=hook_name,
                    error=f"{type(exc).__name__}: {exc}",
                )
                self.reporter.warning(message)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.reporter.run_start(self.plan, str(self.rundir.path))
        self.notify("on_run_start", plan=self.plan, output=str(self.rundir.path))
        try:
            for index, topic in enumerate(self.plan.topics):
                self._current_topic = topic.name
                self.reporter.topic_start(index, len(self.plan.topics), topic)
                self.notify("on_topic_start", topic=topic, index=index, total=len(self.plan.topics))
                result = self.run_topic(topic)
                self.results.append(result)
                self.rundir.write_summary(self.summary())
                self.notify("on_topic_end", topic=topic, result=result.as_dict())
            self.status = "completed"
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except BaseException:
            self.status = "failed"
            raise
        finally:
            self._current_topic = None
            summary = self.summary()
            self.rundir.write_summary(summary)
            self.notify("on_run_end", summary=summary)
            self.rundir.close()
        self.reporter.run_end(summary)
        return summary

    def run_topic(self, topic: Topic) -> TopicResult:
        result = TopicResult(topic.name)
        if hasattr(self.policy, "set_log_target"):
            self.policy.set_log_target(self.on_trainer_log(topic.name))
        self._snapshots.clear()
        for step in self.plan.steps:
            step_result = self.run_step(step, topic, result)
            result.steps.append(step_result)
            self.reporter.step_end(topic, step_result)
            self.notify("on_step_end", topic=topic, step=step.name, result=step_result.as_dict())
        self._snapshots.clear()
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
        if step.name in self._guarded:
            self._snapshots[step.name] = (self.policy.snapshot(), so_far.latest())
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
        result = StepResult(step.name, kind, "ran", metrics, gate_record, self.clock() - started)
        if step.rollback is not None:
            result.rollback = self.check_rollback(step, topic, metrics)
        return result

    def check_rollback(self, step: Step, topic: Topic, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        """Restore the adapter from before ``step.rollback.step`` if a guarded metric fell too far."""
        guard = step.rollback
        assert guard is not None
        if guard.step not in self._snapshots:
            return None  # the guarded step did not run for this topic
        state, before = self._snapshots[guard.step]
        falls = []
        for name, tolerance in guard.max_drop.items():
            if name in before and name in metrics and before[name] - metrics[name] > tolerance + 1e-9:
                falls.append(
                    f"{name} fell {before[name]:.2f} → {metrics[name]:.2f} (more than {tolerance:g})"
                )
        if not falls:
            return None
        self.policy.restore(state)
        reason = f"{'; '.join(falls)} after '{guard.step}'; adapter restored to before '{guard.step}'"
        restored = {name: before[name] for name in metrics if name in before}
        self._record(topic.name, step.name, "rollback", restored, rolled_back=guard.step, reason=reason)
        return {"step": guard.step, "reason": reason, "metrics": restored}

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
