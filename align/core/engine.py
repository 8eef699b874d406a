"""The engine: runs a plan's protocol over its topics with one model and one rank-1 adapter.

The engine knows no objective, evaluator or gate by name; everything it runs came from the
registry through the plan. Each event is appended to ``metrics.jsonl`` as it happens, the
summary is rewritten after every topic, the adapter is saved after every topic, and after every
step a checkpoint records where the run stands, so a crash loses at most the step in progress
and ``align run --resume`` goes on from there.

A step that fails (a plugin raises, or training goes non-finite) has the adapter put back as it
was before the step and is recorded with the plugin, topic, step and reason; then the run stops
(``on_error: stop``, the default) or goes on (``on_error: skip``).

With ``recheck: earlier`` (the default), the end of each topic evaluates every earlier topic again
with the protocol's evaluators, so ``summary.json`` holds a topic-by-topic matrix of what later
training did to earlier topics (``forgetting``).

Under a multi-process launch every process runs this same loop: evaluation is sharded and
gathered inside the model, so every process sees the same metrics; gate and rollback decisions,
and the outcome of lifecycle hooks (which run on the main process only), are taken on the main
process and broadcast, so every process takes the same branch; only the main process writes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from align.core import distributed
from align.core.checkpoint import Checkpoint, Checkpoints, checkpoint_settings, topics_digest
from align.core.components import GateDecision
from align.core.plan import Component, Plan, Step
from align.core.replay import replay_topic, with_person_voice
from align.core.rundir import RunDir
from align.core.topics import NO_ANSWER, Topic
from align.errors import AlignError, NonFiniteTraining, RunStopped
from align.plugins.lifecycle import call_isolated

logger = logging.getLogger(__name__)

#: The longest answer generated for a voice pair without ``rejected``, in tokens.
VOICE_REJECTED_MAX_NEW_TOKENS = 64


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


class Reporter:
    """Where the engine says what it is doing. The base class says nothing."""

    def run_start(self, plan: Plan, output: str) -> None: ...
    def topic_start(self, index: int, total: int, topic: Topic) -> None: ...
    def step_log(self, step: str, logs: Mapping[str, float]) -> None: ...
    def step_end(self, topic: Topic, result: StepResult) -> None: ...
    def topic_end(self, topic: Topic, result: TopicResult) -> None: ...
    def recheck_end(self, topic: Topic, results: Mapping[str, Mapping[str, float]]) -> None: ...
    def run_end(self, summary: Mapping[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def note(self, message: str) -> None: ...


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#: The most metrics one call of an objective or evaluator may return: every step's metrics go into
#: ``metrics.jsonl``, ``summary.json`` (rewritten after each topic) and the forgetting matrix, so a
#: plugin returning 100,000 of them would make every later write megabytes long.
MAX_METRICS = 256


class EvaluateTimeout(TimeoutError):
    """An evaluator did not return within ``evaluate_timeout`` seconds.

    Python cannot stop a thread from outside, so the evaluator's thread may still be using the
    model: the run stops whatever ``on_error`` says (a later step would train or score the model
    under its feet), and the thread ends with the process."""


def call_with_timeout(call: Callable[[], Any], seconds: float) -> Any:
    """``call()`` in a daemon thread, waited for at most ``seconds``: its result, its exception
    (raised here, ``SystemExit`` too), or :class:`EvaluateTimeout` while it still runs."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the waiting thread, which records it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="align-evaluate", daemon=True)
    thread.start()
    thread.join(seconds)  # Ctrl-C still interrupts the wait
    if thread.is_alive():
        raise EvaluateTimeout(f"did not return within {seconds:g}s (evaluate_timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def prefix_metrics(
    name: str, metrics: Mapping[str, Any], where: str, allow_non_finite: bool = False
) -> dict[str, float]:
    """``{key: value}`` returned by component ``name`` as ``{"name.key": float}``; ``where`` names
    the component in the error when it returned something else than numbers, more than
    :data:`MAX_METRICS` of them, or a NaN or infinite one (which strict JSON cannot hold) unless
    ``allow_non_finite`` (training: the engine reports a non-finite loss as training that became
    non-finite)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{where} returned {type(metrics).__name__}, expected a mapping of metric name to number"
        )
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{where} returned {len(metrics)} metrics; at most {MAX_METRICS} per call")
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} returned {key}={value!r}; metric values must be numbers")
        if not allow_non_finite and not math.isfinite(value):
            raise ValueError(f"{where} returned {key}={value}; metric values must be finite numbers")
        flat[f"{name}.{key}"] = float(value)
    return flat


class Engine:
    """Runs ``plan`` with ``policy`` (the model and its adapter), writing into ``rundir``.

    :param resume: a checkpoint to go on from (``align run --resume``); the policy's adapter is
        put back as it was and finished topics and steps are not run again.
    :param seed_step: called with a step's ordinal before the step runs, so each step starts from
        the same random state in a resumed run as in an uninterrupted one.
    """

    def __init__(
        self,
        plan: Plan,
        policy: Any,
        rundir: RunDir,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.perf_counter,
        environment: Mapping[str, str] | None = None,
        hooks: Any = None,
        resume: Checkpoint | None = None,
        seed_step: Callable[[int], None] | None = None,
    ):
        self.plan = plan
        #: The plugin manager whose lifecycle hooks (``on_run_start`` …) watch the run, if any.
        self.hooks = hooks
        self.policy = policy
        self.rundir = rundir
        self.reporter = reporter or Reporter()
        self.clock = clock
        self.environment = dict(environment or {})
        self.seed_step = seed_step
        self.on_error = plan.settings.on_error
        self.evaluate_timeout: float | None = plan.settings.evaluate_timeout
        self.recheck = plan.settings.recheck
        self.replay = plan.settings.replay.as_dict()
        self.voice_set = plan.settings.voice_set
        #: What a recheck runs on earlier topics: each evaluator of the protocol once, as its last
        #: evaluation step configures it (that step's values are the matrix's diagonal).
        self.recheck_evaluators = _evaluators(plan.steps)
        self.results: list[TopicResult] = []
        self.status = "running"
        self.error: str | None = None
        self._started = _now()
        self._start_clock = clock()
        self._seconds_before = 0.0  # time spent in earlier sessions of a resumed run
        self._current_topic: str | None = None
        self._current_step: str | None = None
        self._in_progress: TopicResult | None = None
        #: ``on_trainer_log`` hooks that raised during the step in progress: ``(plugin, message)``.
        self._trainer_log_failures: list[tuple[str, str]] = []
        # Training steps a later step may roll back: the adapter and metrics from before each.
        self._guarded = {step.rollback.step for step in plan.steps if step.rollback is not None}
        self._snapshots: dict[str, tuple[Any, dict[str, float]]] = {}
        self._digest = topics_digest(plan.topics)
        self._settings = checkpoint_settings(plan.config)
        self._checkpoints = (
            Checkpoints(rundir.checkpoint_dir, policy) if hasattr(policy, "save_snapshot") else None
        )
        if hasattr(policy, "set_recorder"):
            policy.set_recorder(self._record_for_step)
        self._resume = resume
        self._start_at = (0, 0)
        if resume is not None:
            self._restore(resume)

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        if state["topics"] != self._digest:
            raise AlignError(
                f"{self.rundir.path}: the topics differ from those the run started with; "
                "a resumed run must train on the same topics (start a new run instead)"
            )
        if self._checkpoints is not None:
            self._checkpoints.sequence = int(state["sequence"])
        self.policy.restore(checkpoint.adapter)
        self.results = [TopicResult.from_dict(r) for r in state["results"]]
        if state["current"] is not None:
            self._in_progress = TopicResult.from_dict(state["current"])
        self._snapshots = dict(checkpoint.snapshots)
        self._started = state["started"]
        self._seconds_before = float(state["seconds"])
        self._start_at = (int(state["topic_index"]), int(state["step_index"]))

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

    def _record_for_step(self, kind: str, data: Mapping[str, Any]) -> None:
        """An event a component records through its policy, about the topic and step in progress."""
        self._record(self._current_topic or "", self._current_step or "", kind, {}, **data)

    def on_trainer_log(self, topic: Topic) -> Callable[[str, dict[str, float]], None]:
        def forward(step: str, logs: dict[str, float]) -> None:
            self._record(topic.name, step, "log", {k: v for k, v in logs.items() if math.isfinite(v)})
            self.reporter.step_log(step, logs)
            if self.hooks is not None and distributed.is_main():
                # Called inside the trainer: what the hook's failure does waits for the step's end
                # (settle_trainer_log_failures), so it never fails the training step it watches.
                failures = self._call_hooks(
                    "on_trainer_log",
                    {"topic": topic, "step": step, "logs": dict(logs)},
                    muted={plugin for plugin, _ in self._trainer_log_failures},
                )
                self._trainer_log_failures.extend(failures)

        return forward

    def settle_trainer_log_failures(self) -> None:
        """Decide on the ``on_trainer_log`` hooks that raised during the step just checkpointed."""
        if self.hooks is None:
            return
        failures, self._trainer_log_failures = self._trainer_log_failures, []
        self._decide(failures)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook through pluggy, each implementation isolated.

        One that raises is recorded (a ``hook_error`` event) and reported with its plugin, topic
        and step; the other implementations are still called. Then ``on_error`` decides, as for
        any plugin: ``skip`` goes on, ``stop`` stops the run with everything so far saved (a hook
        runs after the checkpoint of what it watches, so ``--resume`` does not redo it).
        """
        if self.hooks is None:
            return
        failures: list[tuple[str, str]] = []
        if distributed.is_main():  # loggers and notifiers hear of the run once
            failures = self._call_hooks(hook_name, kwargs)
        self._decide(failures)

    def _decide(self, failures: list[tuple[str, str]]) -> None:
        failures = [
            tuple(f) for f in distributed.broadcast_object(failures)
        ]  # the same decision on every process
        if not failures:
            return
        if self.on_error == "stop" and self.status in ("running", "completed"):
            plugin, message = failures[0]
            if self.status == "completed":
                raise RunStopped(
                    f"{message}; the run completed and its results are saved, or set on_error: skip"
                )
            raise self._stopped(
                message, f"fix the plugin, or disable it with ALIGN_DISABLE_PLUGINS={plugin},"
            )
        for _, message in failures:  # on_error: skip, or the run is already stopping
            self.reporter.warning(message)

    def _call_hooks(
        self, hook_name: str, kwargs: Mapping[str, Any], muted: Collection[str] = ()
    ) -> list[tuple[str, str]]:
        """Call ``hook_name``; return ``(plugin, message)`` for each implementation that raised."""
        assert self.hooks is not None
        failures = []
        for failure in call_isolated(self.hooks, hook_name, kwargs, muted=muted):
            labels = [
                f"{label} '{value}'"
                for label, value in (("topic", self._current_topic), ("step", self._current_step))
                if value
            ]
            where = f" ({', '.join(labels)})" if labels else ""
            message = f"plugin '{failure.plugin}' raised in {hook_name}{where}: {failure.error}"
            self._record(
                self._current_topic or "",
                self._current_step or "",
                "hook_error",
                {},
                plugin=failure.plugin,
                hook=hook_name,
                error=failure.error,
            )
            failures.append((failure.plugin, message))
        return failures

    def _timed_out(self, what: str) -> RunStopped:
        """The error that stops the run after an :class:`EvaluateTimeout`, even with ``on_error: skip``."""
        return RunStopped(
            f"{what}; the run stops even with on_error: skip, as the evaluator still runs and holds "
            f"the model; results so far are kept: fix the evaluator or raise evaluate_timeout in "
            f"{self.rundir.path / 'config.yaml'}, and `align run --resume {self.rundir.path}`"
        )

    def _evaluate(self, component: Component, topic: Topic) -> Any:
        """``component``'s evaluation of ``topic``, within ``evaluate_timeout`` seconds if set."""
        if self.evaluate_timeout is None:
            return component.instance.evaluate(self.policy.language_model, topic)
        language_model = self.policy.language_model
        return call_with_timeout(
            lambda: component.instance.evaluate(language_model, topic), self.evaluate_timeout
        )

    def _stopped(self, what: str, fix: str, also: str = "") -> RunStopped:
        """The error that stops the run (``on_error: stop``): what failed, how to fix it and go on."""
        return RunStopped(
            f"{what}; results so far are kept: {fix} and `align run --resume {self.rundir.path}`, "
            f"or set on_error: skip{also}"
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self, topic_index: int, step_index: int) -> None:
        """Record that the run stands before step ``step_index`` of topic ``topic_index``."""
        if self._checkpoints is None:
            return
        state = {
            "status": self.status,
            "topic_index": topic_index,
            "step_index": step_index,
            "next": self._describe_position(topic_index, step_index),
            "topics": self._digest,
            "settings": self._settings,
            "results": [r.as_dict() for r in self.results],
            "current": self._in_progress.as_dict() if self._in_progress is not None else None,
            "metrics_offset": self.rundir.metrics_offset(),
            "metrics_sha256": self.rundir.metrics_sha256(),
            "started": self._started,
            "seconds": round(self._elapsed(), 3),
            "environment": self.environment,
        }
        self._checkpoints.save(state, self.policy.snapshot(), self._snapshots)

    def _describe_position(self, topic_index: int, step_index: int) -> str:
        if topic_index >= len(self.plan.topics):
            return "done"
        topic = self.plan.topics[topic_index].name
        if step_index >= len(self.plan.steps):
            if self._rechecks(topic_index):
                return f"topic '{topic}': rechecking earlier topics and saving its adapter"
            return f"topic '{topic}': saving its adapter"
        return f"topic '{topic}', step '{self.plan.steps[step_index].name}'"

    def _elapsed(self) -> float:
        return self._seconds_before + self.clock() - self._start_clock

    def _voice_rejected_from_bare_model(self) -> None:
        """Give every voice pair without ``rejected`` the model's own greedy answer to its prompt,
        generated once, before any training (the adapter starts as a no-op): the voice score then
        compares the person with the model's default. Recorded as a ``generated`` event and in
        ``topics.json``, which ``--resume`` reads, so a resumed run never generates them again."""
        import dataclasses

        missing = [
            pair.prompt for topic in self.plan.topics for pair in topic.voice_pairs if pair.rejected is None
        ]
        if not missing:
            return
        prompts = list(dict.fromkeys(missing))
        answers = self.policy.language_model.generate(prompts, max_new_tokens=VOICE_REJECTED_MAX_NEW_TOKENS)
        answer_of = {prompt: answer.strip() or NO_ANSWER for prompt, answer in zip(prompts, answers)}
        self.plan.topics = [
            dataclasses.replace(
                topic,
                voice_pairs=tuple(
                    pair
                    if pair.rejected is not None
                    else dataclasses.replace(pair, rejected=answer_of[pair.prompt])
                    for pair in topic.voice_pairs
                ),
            )
            for topic in self.plan.topics
        ]
        self._digest = topics_digest(self.plan.topics)
        self.rundir.write_topics([topic.to_dict() for topic in self.plan.topics])
        self._record(
            "",
            "",
            "generated",
            {},
            purpose="voice_rejected",
            answers=[{"prompt": prompt, "answer": answer_of[prompt]} for prompt in prompts],
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.reporter.run_start(self.plan, str(self.rundir.path))
        first_topic, first_step = self._start_at
        if self._resume is not None:
            where = self._describe_position(first_topic, first_step)
            self._record("", "", "resume", {}, at=where, topic_index=first_topic, step_index=first_step)
            self.reporter.note(f"resuming at {where}")
        try:
            if self._resume is None:
                # Inside the try: a failure while generating is the run's recorded failure.
                self._voice_rejected_from_bare_model()
                self._checkpoint(0, 0)  # the adapter as the run starts
            self.notify("on_run_start", plan=self.plan, output=str(self.rundir.path))
            for index in range(first_topic, len(self.plan.topics)):
                topic = self.plan.topics[index]
                self._current_topic = topic.name
                self.reporter.topic_start(index, len(self.plan.topics), topic)
                self.notify("on_topic_start", topic=topic, index=index, total=len(self.plan.topics))
                result = self.run_topic(topic, index, first_step if index == first_topic else 0)
                self.results.append(result)
                self._in_progress = None
                self.rundir.write_summary(self.summary())
                self._checkpoint(index + 1, 0)
                self.reporter.topic_end(topic, result)
                self.notify("on_topic_end", topic=topic, result=result.as_dict())
            self.status = "completed"
        except KeyboardInterrupt:
            self.status = "interrupted"
            raise
        except RunStopped as exc:
            self.status = "failed"
            self.error = str(exc)
            raise
        except BaseException as exc:
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._current_topic = self._current_step = None
            summary = self.summary()
            try:
                self.rundir.write_summary(summary)
                if self.status == "completed":
                    self._checkpoint(len(self.plan.topics), 0)
                self.notify("on_run_end", summary=summary)
            finally:
                self.rundir.close()  # releases the lock, even when the disk is full
        self.reporter.run_end(summary)
        return summary

    def run_topic(self, topic: Topic, index: int = 0, first_step: int = 0) -> TopicResult:
        """Run the protocol's steps for ``topic``, from ``first_step`` when resuming it."""
        if first_step and self._in_progress is not None and self._in_progress.name == topic.name:
            result = self._in_progress
        else:
            result = TopicResult(topic.name)
            self._snapshots.clear()
        self._in_progress = result
        if hasattr(self.policy, "set_log_target"):
            self.policy.set_log_target(self.on_trainer_log(topic), topic=topic.name)
        for step_index in range(first_step, len(self.plan.steps)):
            step = self.plan.steps[step_index]
            self._current_step = step.name
            if self.seed_step is not None:
                self.seed_step(index * len(self.plan.steps) + step_index)
            logger.info("topic '%s': step '%s' starts", topic.name, step.name)
            step_result = self.run_step(step, topic, result)
            logger.info(
                "topic '%s': step '%s' %s in %.2fs",
                topic.name,
                step.name,
                step_result.status,
                step_result.seconds,
            )
            result.steps.append(step_result)
            timed_out = (
                step_result.status == "failed" and step_result.error["exception"] == EvaluateTimeout.__name__
            )
            if step_result.status == "failed" and (self.on_error == "stop" or timed_out):
                self._trainer_log_failures = []  # the step's own failure is what stops the run
                result.steps.pop()  # a resumed run runs this step again
                self._checkpoint(index, step_index)  # keeps the error event in metrics.jsonl
                result.steps.append(step_result)
                self.reporter.step_end(topic, step_result)
                self.notify("on_step_end", topic=topic, step=step.name, result=step_result.as_dict())
                if timed_out:
                    raise self._timed_out(
                        f"topic '{topic.name}', step '{step.name}': {step_result.error['reason']}"
                    )
                fix = "fix the cause"
                if step_result.error["exception"] == NonFiniteTraining.__name__:
                    fix = f"lower {step_result.error['component']}.learning_rate in {self.rundir.path / 'config.yaml'}"
                raise self._stopped(
                    f"topic '{topic.name}', step '{step.name}': {step_result.error['reason']}", fix
                )
            self._checkpoint(index, step_index + 1)
            self.reporter.step_end(topic, step_result)
            self.notify("on_step_end", topic=topic, step=step.name, result=step_result.as_dict())
            self.settle_trainer_log_failures()
        self._current_step = None
        self._snapshots.clear()
        # Part of the topic's end: a resumed run at this position redoes it (evaluation is
        # deterministic and the adapter does not change), so the checkpoint needs no step for it.
        if self._rechecks(index):
            if self.seed_step is not None:
                self.seed_step(index * len(self.plan.steps) + len(self.plan.steps))
            started = self.clock()
            result.recheck = self.recheck_earlier(topic, index)
            result.recheck_seconds = self.clock() - started
            logger.info(
                "topic '%s': rechecked %d earlier topics in %.2fs", topic.name, index, result.recheck_seconds
            )
            self.reporter.recheck_end(topic, result.recheck)
        adapter_dir = self.rundir.adapter_dir(topic.name)
        # The main process of a multi-process run writes; every process holds the same adapter, but
        # under FSDP each holds a shard, and gathering them takes every process.
        if self.rundir.writer or distributed.lockstep():
            self.policy.save_adapter(adapter_dir)
        if self.rundir.writer:
            self.write_card(adapter_dir, result)
        logger.debug("topic '%s': adapter saved to %s", topic.name, adapter_dir)
        result.adapter = str(adapter_dir.relative_to(self.rundir.path))
        return result

    def write_card(self, adapter_dir: Any, result: TopicResult) -> None:
        """Replace the adapter's ``README.md`` (PEFT writes an empty template) with align's model
        card: the base's hub id, the topics trained so far, the settings, this topic's metrics."""
        from align.card import model_card
        from align.core.rundir import atomic_write_text

        results = [r.as_dict() for r in self.results if r.name != result.name] + [result.as_dict()]
        card = model_card("adapter", config=self.plan.config, results=results)
        atomic_write_text(adapter_dir / "README.md", card)

    def _rechecks(self, index: int) -> bool:
        return self.recheck == "earlier" and index > 0 and bool(self.recheck_evaluators)

    def recheck_earlier(self, topic: Topic, index: int) -> dict[str, dict[str, float]]:
        """Evaluate every topic before ``topic`` (number ``index``) again with the current adapter.

        One ``recheck`` event per earlier topic, written once all are measured (so a recheck that
        stops the run leaves only its error event, and the resumed run writes each event once). An
        evaluator that raises follows ``on_error``: ``stop`` raises :class:`RunStopped` after a
        checkpoint at the topic's end, ``skip`` leaves its metrics out and goes on.
        """
        self._current_step = "recheck"
        results: dict[str, dict[str, float]] = {}
        for target in self.plan.topics[:index]:
            metrics: dict[str, float] = {}
            for component in self.recheck_evaluators:
                try:
                    raw = self._evaluate(component, self._scored(target))
                    metrics.update(prefix_metrics(component.name, raw, f"evaluator '{component.name}'"))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # SystemExit too (see run_step)
                    error = self._record_error("recheck", topic, component, exc, target=target.name)
                    where = f"topic '{topic.name}', recheck of '{target.name}'"
                    if isinstance(exc, EvaluateTimeout):
                        self._checkpoint(index, len(self.plan.steps))
                        raise self._timed_out(f"{where}: {error['reason']}") from exc
                    if self.on_error == "stop":
                        self._checkpoint(index, len(self.plan.steps))  # keeps the error event
                        raise self._stopped(
                            f"{where}: {error['reason']}", "fix the cause", also=" (or recheck: none)"
                        ) from exc
                    self.reporter.warning(f"{where}: {error['reason']} (on_error: skip)")
            results[target.name] = metrics
        for target_name, metrics in results.items():
            self._record(topic.name, "recheck", "recheck", metrics, target=target_name)
        self._current_step = None
        return results

    def forgetting(self) -> dict[str, Any]:
        """``summary["forgetting"]``: per metric, ``M[i][j]`` is topic ``j``'s value right after
        topic ``i`` was trained (``j < i``: a recheck; ``j == i``: topic ``i``'s own last
        evaluation), ``None`` for ``j > i`` or a value not measured; a row per finished topic."""
        names = [topic.name for topic in self.plan.topics]
        prefixes = {component.name for component in self.recheck_evaluators}
        rows = [{**result.recheck, result.name: result.evaluated(prefixes)} for result in self.results]
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

    def _training_topic(self, step: Step, topic: Topic, objective: Any = None) -> Topic:
        """What a training step of ``topic`` trains on: the topic, plus a sample of every earlier
        topic's training items when ``replay`` asks for them (recorded as a ``replay`` event).
        Only the fields the objective reads (its ``requires``) are replayed: a DPO step gets
        earlier preference pairs, not passages it would never look at."""
        index = next(i for i, t in enumerate(self.plan.topics) if t.name == topic.name)
        settings = self.replay
        reads = getattr(objective, "requires", None)
        if reads is not None:
            settings = {name: value for name, value in settings.items() if name in reads}
        if index == 0 or not any(settings.values()):
            return topic
        mixed, chosen = replay_topic(
            topic, self.plan.topics[:index], settings, self.plan.settings.seed, step.name
        )
        if chosen:
            counts = {name: float(len(items)) for name, items in chosen.items()}
            self._record(topic.name, step.name, "replay", counts, items=chosen)
        return mixed

    def _scored(self, topic: Topic) -> Topic:
        """What an evaluator scores ``topic`` on: with ``voice_set: person``, the voice pairs of
        every topic of the run (a voice belongs to the person), else the topic's own."""
        if self.voice_set == "person":
            return with_person_voice(topic, self.plan.topics)
        return topic

    def run_step(self, step: Step, topic: Topic, so_far: TopicResult) -> StepResult:
        kind = step.kind
        if step.if_ran is not None and not so_far.ran(step.if_ran):
            reason = f"step '{step.if_ran}' did not run"
            self._record(topic.name, step.name, "skip", {}, reason=reason)
            return StepResult(step.name, kind, "skipped", gate={"passed": False, "reason": reason})
        gate_record = None
        started = self.clock()
        before = self.policy.snapshot() if step.kind == "train" else None
        component = step.gate
        try:
            if step.gate is not None:
                decision = self.decide(step, so_far.latest())
                gate_record = {"gate": step.gate.name, "passed": decision.passed, "reason": decision.reason}
                self._record(
                    topic.name, step.name, "gate", {}, passed=decision.passed, reason=decision.reason
                )
                if not decision.passed:
                    return StepResult(step.name, kind, "skipped", gate=gate_record)
            if step.name in self._guarded:
                self._snapshots[step.name] = (before, so_far.latest())
            metrics: dict[str, float] = {}
            for component in step.components:
                if step.kind == "train":
                    raw = component.instance.train(
                        self.policy, self._training_topic(step, topic, component.instance)
                    )
                    where = f"objective '{component.name}'"
                else:
                    raw = self._evaluate(component, self._scored(topic))
                    where = f"evaluator '{component.name}'"
                metrics.update(
                    prefix_metrics(component.name, raw, where, allow_non_finite=step.kind == "train")
                )
            if step.kind == "train":
                _check_finite(metrics)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's SystemExit too: a failed step, not a silent exit 0
            return self._failed(step, topic, component, exc, before, gate_record, self.clock() - started)
        self._record(topic.name, step.name, kind, metrics)
        result = StepResult(step.name, kind, "ran", metrics, gate_record, self.clock() - started)
        if step.rollback is not None:
            result.rollback = self.check_rollback(step, topic, metrics)
        return result

    def _failed(
        self,
        step: Step,
        topic: Topic,
        component: Component | None,
        exc: BaseException,
        before: Any,
        gate: dict[str, Any] | None,
        seconds: float,
    ) -> StepResult:
        """Put the adapter back as it was before ``step``, and record why the step failed."""
        if not distributed.is_main():  # only the main process prints: say it here, or nobody will
            logger.warning(
                "process %d of %d: topic '%s', step '%s' failed here (%s: %s); the other processes "
                "may wait for this one",
                distributed.rank(),
                distributed.world_size(),
                topic.name,
                step.name,
                type(exc).__name__,
                exc,
            )
        if before is not None:
            self.policy.restore(before)
        self._snapshots.pop(step.name, None)
        error = self._record_error(step.name, topic, component, exc, restored=before is not None)
        kind = step.kind
        if self.on_error == "skip" and not isinstance(exc, EvaluateTimeout):  # that one stops the run
            self.reporter.warning(
                f"topic '{topic.name}', step '{step.name}': {error['reason']} (on_error: skip)"
            )
        return StepResult(step.name, kind, "failed", gate=gate, seconds=seconds, error=error)

    def _record_error(
        self,
        step_name: str,
        topic: Topic,
        component: Component | None,
        exc: BaseException,
        restored: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """Record an ``error`` event for a failed step (or recheck); returns what it holds."""
        if isinstance(exc, NonFiniteTraining):
            what = f"training became non-finite: {exc}"
        elif isinstance(exc, AlignError):
            what = str(exc)
        else:
            what = f"{type(exc).__name__}: {exc}"
        who = f"{component.kind} '{component.name}'" if component is not None else f"step '{step_name}'"
        if component is not None and component.plugin:
            who += f" (plugin '{component.plugin}')"
        reason = f"{who} failed: {what}"
        if restored:
            reason += "; adapter restored to before the step"
        error = {
            "plugin": component.plugin if component is not None else "",
            "component": component.name if component is not None else "",
            "exception": type(exc).__name__,
            "reason": reason,
        }
        self._record(topic.name, step_name, "error", {}, **extra, **error)
        return error

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
        falls = distributed.broadcast_object(falls)  # decided once: every process restores, or none
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
        if distributed.is_distributed():  # decided once, on the main process: the same on every process
            passed, reason = distributed.broadcast_object([decision.passed, decision.reason])
            decision = GateDecision(passed=bool(passed), reason=reason)
        return decision

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds; a topic cut short by a failure or Ctrl-C is listed with
        ``"complete": false``."""
        topics = [result.as_dict() for result in self.results]
        if self._in_progress is not None and self.status != "running":
            topics.append({**self._in_progress.as_dict(), "complete": False})
        summary = {
            "status": self.status,
            "started": self._started,
            "seconds": round(self._elapsed(), 3),
            "output": str(self.rundir.path),
            "seed": self.plan.settings.seed,
            "environment": self.environment,
            "steps": [step.name for step in self.plan.steps],
            "topics": topics,
        }
        if self.recheck == "earlier":
            summary["forgetting"] = self.forgetting()
        if self.error is not None:
            summary["error"] = self.error
        return summary


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


def _evaluators(steps: list[Step]) -> list[Component]:
    """The protocol's evaluators, each once (by name, in order of first use), as last configured;
    an evaluator whose class sets ``recheck = False`` (slow ones, like ``style``) is left out."""
    found: dict[str, Component] = {}
    for step in steps:
        if step.kind == "eval":
            for component in step.components:
                if getattr(component.instance, "recheck", True):
                    found[component.name] = component
    return list(found.values())


def _check_finite(metrics: Mapping[str, float]) -> None:
    """A training step whose reported loss (or any metric) is NaN or infinite failed."""
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteTraining(", ".join(f"{name} is {value}" for name, value in bad.items()))
