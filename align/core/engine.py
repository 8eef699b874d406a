"""The engine: runs a plan's protocol over its topics with one model and one rank-1 adapter.

The engine knows no objective, evaluator or gate by name; everything it runs came from the
registry through the plan. Each event is appended to ``metrics.jsonl`` as it happens, the
summary is rewritten after every topic, the adapter is saved after every topic, and after every
step a checkpoint records where the run stands, so a crash loses at most the step in progress
and ``align run --resume`` goes on from there. What happens is emitted as events
(:mod:`align.core.events`) to the metrics log, the checkpoint, the console and the plugins' hooks.

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

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from align.core import distributed
from align.core.calls import (
    MAX_METRICS,
    EvaluateTimeout,
    call_with_timeout,
    check_finite,
    evaluators,
    failure_record,
    prefix_metrics,
)
from align.core.checkpoint import Checkpoint, Checkpoints, checkpoint_settings, topics_digest
from align.core.components import GateDecision, TrainingPolicy
from align.core.events import (
    Checkpointer,
    Console,
    EventBus,
    Hooks,
    Noted,
    Rechecked,
    Recorded,
    Reporter,
    RunClosed,
    RunEnded,
    RunLog,
    RunStarted,
    RunStarting,
    StepEnded,
    TopicEnded,
    TopicStarted,
    TrainerLogged,
    Warned,
    now,
)
from align.core.plan import Component, Plan, Step
from align.core.replay import replay_topic, with_generated_rejected, with_person_voice
from align.core.results import StepResult, TopicResult, forgetting_matrix, retention_scores
from align.core.reuse import Evaluations
from align.core.rundir import RunDir
from align.core.topics import Topic
from align.errors import AlignError, NonFiniteTraining, RunStopped
from align.plugins.lifecycle import Lifecycle

#: Also the names other modules have long imported from here (defined in calls, events, results).
__all__ = [
    "MAX_METRICS",
    "Engine",
    "EvaluateTimeout",
    "Reporter",
    "StepResult",
    "TopicResult",
    "call_with_timeout",
    "prefix_metrics",
    "retention_scores",
]

logger = logging.getLogger(__name__)

#: The longest answer generated for a voice pair without ``rejected``, in tokens.
VOICE_REJECTED_MAX_NEW_TOKENS = 64


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
        policy: TrainingPolicy,
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
        self.replay_schedule = plan.settings.replay.schedule
        self.voice_set = plan.settings.voice_set
        #: What a recheck runs on earlier topics: each evaluator of the protocol once, as its last
        #: evaluation step configures it (that step's values are the matrix's diagonal).
        self.recheck_evaluators = evaluators(plan.steps)
        self.results: list[TopicResult] = []
        self.status = "running"
        self.error: str | None = None
        self._started = now()
        self._start_clock = clock()
        self._seconds_before = 0.0  # time spent in earlier sessions of a resumed run
        #: Where the run stands (hook failures are named with them).
        self.current_topic: str | None = None
        self.current_step: str | None = None
        self._in_progress: TopicResult | None = None
        # Training steps a later step may roll back: the adapter and metrics from before each.
        self._guarded = {step.rollback.step for step in plan.steps if step.rollback is not None}
        self._snapshots: dict[str, tuple[Any, dict[str, float]]] = {}
        self._evaluations = Evaluations()
        self._digest = topics_digest(plan.topics)
        self._settings = checkpoint_settings(plan.config)
        self._checkpoints = Checkpoints(rundir.checkpoint_dir, policy)
        # The one events path, in its fixed order (align.core.events): the metrics log, the
        # checkpoint, the console, then the plugins' hooks.
        subscribers = [RunLog(rundir), Checkpointer(self._checkpoint), Console(self.reporter)]
        if hooks is not None:
            subscribers.append(Hooks(Lifecycle(hooks), self))
        self.bus = EventBus(subscribers)
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
        self.bus.emit(Recorded(topic, step, kind, metrics, extra))

    def _record_for_step(self, kind: str, data: Mapping[str, Any]) -> None:
        """An event a component records through its policy, about the topic and step in progress."""
        self._record(self.current_topic or "", self.current_step or "", kind, {}, **data)

    def on_trainer_log(self, topic: Topic) -> Callable[[str, dict[str, float]], None]:
        def forward(step: str, logs: dict[str, float]) -> None:
            self.bus.emit(TrainerLogged(topic, step, logs))

        return forward

    def _timed_out(self, what: str) -> RunStopped:
        """The error that stops the run after an :class:`EvaluateTimeout`, even with ``on_error: skip``."""
        return RunStopped(
            f"{what}; the run stops even with on_error: skip, as the evaluator still runs and holds "
            f"the model; results so far are kept: fix the evaluator or raise evaluate_timeout in "
            f"{self.rundir.path / 'config.yaml'}, and `align run --resume {self.rundir.path}`"
        )

    def _evaluate(self, component: Component, topic: Topic, weights: str | None) -> Any:
        """``component``'s evaluation of ``topic``, within ``evaluate_timeout`` seconds if set, or
        the metrics of the same evaluation of the same weights (``weights``, their fingerprint)
        made earlier (:mod:`align.core.reuse`)."""
        key = self._evaluations.key(component.name, component.instance, topic, weights)
        reused = self._evaluations.get(key)
        if reused is not None:
            return reused
        language_model = self.policy.language_model
        if self.evaluate_timeout is None:
            raw = component.instance.evaluate(language_model, topic)
        else:
            raw = call_with_timeout(
                lambda: component.instance.evaluate(language_model, topic), self.evaluate_timeout
            )
        self._evaluations.put(key, raw)
        return raw

    def stopped(self, what: str, fix: str, also: str = "") -> RunStopped:
        """The error that stops the run (``on_error: stop``): what failed, how to fix it and go on."""
        return RunStopped(
            f"{what}; results so far are kept: {fix} and `align run --resume {self.rundir.path}`, "
            f"or set on_error: skip{also}"
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self, topic_index: int, step_index: int, redo: bool = False) -> None:
        """Record that the run stands before step ``step_index`` of topic ``topic_index``;
        ``redo``: without the topic's last step result (the step that stopped the run)."""
        current = self._in_progress.as_dict() if self._in_progress is not None else None
        if redo and current is not None:
            current["steps"] = current["steps"][:-1]  # a resumed run runs this step again
        state = {
            "status": self.status,
            "topic_index": topic_index,
            "step_index": step_index,
            "next": self._describe_position(topic_index, step_index),
            "topics": self._digest,
            "settings": self._settings,
            "results": [r.as_dict() for r in self.results],
            "current": current,
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
        generated = with_generated_rejected(
            self.plan.topics, self.policy.language_model, VOICE_REJECTED_MAX_NEW_TOKENS
        )
        if generated is None:
            return
        self.plan.topics, answer_of = generated
        self._digest = topics_digest(self.plan.topics)
        self.rundir.write_topics([topic.to_dict() for topic in self.plan.topics])
        self._record(
            "",
            "",
            "generated",
            {},
            purpose="voice_rejected",
            answers=[{"prompt": prompt, "answer": answer} for prompt, answer in answer_of.items()],
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        output = str(self.rundir.path)
        self.bus.emit(RunStarting(self.plan, output))
        first_topic, first_step = self._start_at
        if self._resume is not None:
            where = self._describe_position(first_topic, first_step)
            self._record("", "", "resume", {}, at=where, topic_index=first_topic, step_index=first_step)
            self.bus.emit(Noted(f"resuming at {where}"))
        try:
            if self._resume is None:
                # Inside the try: a failure while generating is the run's recorded failure.
                self._voice_rejected_from_bare_model()
            self.bus.emit(RunStarted(self.plan, output, resumed=self._resume is not None))
            total = len(self.plan.topics)
            for index in range(first_topic, total):
                topic = self.plan.topics[index]
                self.current_topic = topic.name
                self.bus.emit(TopicStarted(topic, index, total))
                result = self.run_topic(topic, index, first_step if index == first_topic else 0)
                self.results.append(result)
                self._in_progress = None
                self.bus.emit(TopicEnded(topic, index, result, self.summary()))
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
            self.current_topic = self.current_step = None
            summary = self.summary()
            try:
                self.bus.emit(RunEnded(summary, self.status == "completed", len(self.plan.topics)))
            finally:
                self.rundir.close()  # releases the lock, even when the disk is full
        self.bus.emit(RunClosed(summary))
        return summary

    def run_topic(self, topic: Topic, index: int = 0, first_step: int = 0) -> TopicResult:
        """Run the protocol's steps for ``topic``, from ``first_step`` when resuming it."""
        if first_step and self._in_progress is not None and self._in_progress.name == topic.name:
            result = self._in_progress
        else:
            result = TopicResult(topic.name)
            self._snapshots.clear()
        self._in_progress = result
        self.policy.set_log_target(self.on_trainer_log(topic), topic=topic.name)
        for step_index in range(first_step, len(self.plan.steps)):
            step = self.plan.steps[step_index]
            self.current_step = step.name
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
            stops = step_result.status == "failed" and (self.on_error == "stop" or timed_out)
            # Checkpointed before the step when it stops the run (keeping its error event in
            # metrics.jsonl, a resumed run runs it again), else after it.
            self.bus.emit(StepEnded(topic, index, step_index, step_result, stops=stops))
            if stops:
                if timed_out:
                    raise self._timed_out(
                        f"topic '{topic.name}', step '{step.name}': {step_result.error['reason']}"
                    )
                fix = "fix the cause"
                if step_result.error["exception"] == NonFiniteTraining.__name__:
                    fix = f"lower {step_result.error['component']}.learning_rate in {self.rundir.path / 'config.yaml'}"
                raise self.stopped(
                    f"topic '{topic.name}', step '{step.name}': {step_result.error['reason']}", fix
                )
        self.current_step = None
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
            self.bus.emit(Rechecked(topic, result.recheck))
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

        The caller emits them as :class:`~align.core.events.Rechecked` (a ``recheck`` event per
        earlier topic, written once all are measured; see :class:`~align.core.events.RunLog`). An
        evaluator that raises follows ``on_error``: ``stop`` raises :class:`RunStopped` after a
        checkpoint at the topic's end, ``skip`` leaves its metrics out and goes on.
        """
        self.current_step = "recheck"
        results: dict[str, dict[str, float]] = {}
        weights = self._evaluations.weights(self.policy, self.recheck_evaluators)
        for target in self.plan.topics[:index]:
            metrics: dict[str, float] = {}
            for component in self.recheck_evaluators:
                try:
                    raw = self._evaluate(component, self._scored(target), weights)
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
                        raise self.stopped(
                            f"{where}: {error['reason']}", "fix the cause", also=" (or recheck: none)"
                        ) from exc
                    self.bus.emit(Warned(f"{where}: {error['reason']} (on_error: skip)"))
            results[target.name] = metrics
        self.current_step = None
        return results

    def forgetting(self) -> dict[str, Any]:
        """``summary["forgetting"]`` (:func:`~align.core.results.forgetting_matrix`)."""
        prefixes = {component.name for component in self.recheck_evaluators}
        return forgetting_matrix([topic.name for topic in self.plan.topics], self.results, prefixes)

    def _training_topic(self, step: Step, topic: Topic, objective: Any = None) -> Topic:
        """What a training step of ``topic`` trains on: the topic, plus a sample of every earlier
        topic's training items when ``replay`` asks for them (recorded as a ``replay`` event).
        Only the fields the objective reads (its ``reads``, else its ``requires``) are replayed: a
        DPO step gets earlier preference pairs, not passages it would never look at."""
        index = next(i for i, t in enumerate(self.plan.topics) if t.name == topic.name)
        settings = self.replay
        reads = getattr(objective, "reads", None)
        if reads is None:  # an objective that reads nothing says so with reads = ()
            reads = getattr(objective, "requires", None)
        if reads is not None:
            settings = {name: value for name, value in settings.items() if name in reads}
        if index == 0 or not any(settings.values()):
            return topic
        mixed, chosen = replay_topic(
            topic,
            self.plan.topics[:index],
            settings,
            self.plan.settings.seed,
            step.name,
            self.replay_schedule,
            self.policy.language_model,
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
            weights = self._evaluations.weights(self.policy, step.components) if kind == "eval" else None
            for component in step.components:
                if step.kind == "train":
                    raw = component.instance.train(
                        self.policy, self._training_topic(step, topic, component.instance)
                    )
                    where = f"objective '{component.name}'"
                else:
                    raw = self._evaluate(component, self._scored(topic), weights)
                    where = f"evaluator '{component.name}'"
                metrics.update(
                    prefix_metrics(component.name, raw, where, allow_non_finite=step.kind == "train")
                )
            if step.kind == "train":
                check_finite(metrics)
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
            self.bus.emit(
                Warned(f"topic '{topic.name}', step '{step.name}': {error['reason']} (on_error: skip)")
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
        error = failure_record(step_name, component, exc, restored)
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
