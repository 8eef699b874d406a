"""The events path: what the engine says happened, and who hears of it, in which order.

The engine emits typed events (the frozen dataclasses below) on one :class:`EventBus`; the bus
hands each event to its subscribers one after the other, always in this order:

1. :class:`RunLog`: ``metrics.jsonl`` (a line per :class:`Recorded`, trainer log and recheck) and
   ``summary.json`` (rewritten at each topic's end and at the run's end);
2. :class:`Checkpointer`: the checkpoint, where the event moves the run on (a step, a topic, the
   start and the end of the run);
3. :class:`Console`: the :class:`Reporter` (what ``align run`` prints);
4. :class:`Hooks`: the plugins' lifecycle hooks (``on_run_start`` …), on the main process only.

So a hook always runs after the checkpoint of what it watches: ``--resume`` never redoes a step
because a tracker failed. A hook implementation that raises is isolated (the others still run),
recorded as a ``hook_error`` event and broadcast, so every process of a multi-process run takes
the same ``on_error`` decision (stop with everything saved, or warn). ``on_trainer_log`` runs
inside the trainer: its failures are decided once the step is saved (:class:`StepEnded`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align.core import distributed
from align.core.results import StepResult, TopicResult
from align.errors import RunStopped
from align.plugins.lifecycle import HookFailure, Lifecycle

if TYPE_CHECKING:
    from align.core.engine import Engine
    from align.core.plan import Plan
    from align.core.rundir import RunDir
    from align.core.topics import Topic


def now() -> str:
    """The time an event is recorded at, as ``metrics.jsonl`` holds it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recorded:
    """A line of ``metrics.jsonl``: a gate's decision, a skip, a step's metrics, a rollback, an
    error, a replay, a resume, a hook's failure, what a component records through its policy …"""

    topic: str
    step: str
    kind: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStarting:
    """The run is about to start (before anything is generated or checkpointed)."""

    plan: Plan
    output: str


@dataclass(frozen=True)
class RunStarted:
    """The run has started: a new run checkpoints the adapter as it starts; a resumed one not."""

    plan: Plan
    output: str
    resumed: bool


@dataclass(frozen=True)
class TopicStarted:
    topic: Topic
    index: int
    total: int


@dataclass(frozen=True)
class TrainerLogged:
    """A trainer's log during a training step (loss, learning rate …, as the trainer gives it)."""

    topic: Topic
    step: str
    logs: Mapping[str, float]


@dataclass(frozen=True)
class StepEnded:
    """Step ``step_index`` of topic ``topic_index`` ended with ``result``. ``stops``: its failure
    stops the run, so the checkpoint stands before it (a resumed run runs it again)."""

    topic: Topic
    topic_index: int
    step_index: int
    result: StepResult
    stops: bool = False


@dataclass(frozen=True)
class Rechecked:
    """Every earlier topic measured again after ``topic``: target topic → its metrics."""

    topic: Topic
    results: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class TopicEnded:
    topic: Topic
    index: int
    result: TopicResult
    summary: dict[str, Any]


@dataclass(frozen=True)
class RunEnded:
    """The run ended (completed, failed or interrupted); ``topics``: how many the plan has."""

    summary: dict[str, Any]
    completed: bool
    topics: int


@dataclass(frozen=True)
class RunClosed:
    """The run directory is closed after a run that returned: the end-of-run report."""

    summary: dict[str, Any]


@dataclass(frozen=True)
class Warned:
    message: str


@dataclass(frozen=True)
class Noted:
    message: str


Event = (
    Recorded
    | RunStarting
    | RunStarted
    | TopicStarted
    | TrainerLogged
    | StepEnded
    | Rechecked
    | TopicEnded
    | RunEnded
    | RunClosed
    | Warned
    | Noted
)

Subscriber = Callable[[Any], None]


class EventBus:
    """Hands each event to every subscriber, in the order given (see the module's docstring).

    A subscriber's exception goes on to the engine (a full disk, a hook's ``on_error: stop``):
    the later subscribers do not hear of that event. A subscriber may emit events itself (the
    hooks record their failures and warn through the bus)."""

    def __init__(self, subscribers: Iterable[Subscriber]):
        self.subscribers = list(subscribers)

    def emit(self, event: Any) -> None:
        for subscriber in self.subscribers:
            subscriber(event)


# -- the subscribers ------------------------------------------------------------------------------
class RunLog:
    """``metrics.jsonl`` and ``summary.json`` of the run directory."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    def __call__(self, event: Any) -> None:
        if isinstance(event, Recorded):
            self.record(event.topic, event.step, event.kind, event.metrics, **event.extra)
        elif isinstance(event, TrainerLogged):
            finite = {k: v for k, v in event.logs.items() if math.isfinite(v)}
            self.record(event.topic.name, event.step, "log", finite)
        elif isinstance(event, Rechecked):
            # One event per earlier topic, written once all are measured (so a recheck that stops
            # the run leaves only its error event, and the resumed run writes each event once).
            for target, metrics in event.results.items():
                self.record(event.topic.name, "recheck", "recheck", metrics, target=target)
        elif isinstance(event, (TopicEnded, RunEnded)):
            self.rundir.write_summary(event.summary)

    def record(self, topic: str, step: str, kind: str, metrics: Mapping[str, float], **extra: Any) -> None:
        line = {"time": now(), "topic": topic, "step": step, "kind": kind, "metrics": dict(metrics), **extra}
        self.rundir.record(line)


class Checkpointer:
    """The checkpoint, through ``save(topic_index, step_index, redo)``: the run stands before step
    ``step_index`` of topic ``topic_index``; ``redo``: the in-progress topic's last step result is
    left out (the step that stopped the run, which a resumed run runs again)."""

    def __init__(self, save: Callable[[int, int, bool], None]):
        self.save = save

    def __call__(self, event: Any) -> None:
        if isinstance(event, RunStarted):
            if not event.resumed:
                self.save(0, 0, False)  # the adapter as the run starts
        elif isinstance(event, StepEnded):
            if event.stops:
                self.save(event.topic_index, event.step_index, True)  # keeps the error event
            else:
                self.save(event.topic_index, event.step_index + 1, False)
        elif isinstance(event, TopicEnded):
            self.save(event.index + 1, 0, False)
        elif isinstance(event, RunEnded) and event.completed:
            self.save(event.topics, 0, False)


class Reporter:
    """Where the engine says what it is doing (:class:`Console` calls it). The base class says nothing."""

    def run_start(self, plan: Plan, output: str) -> None: ...
    def topic_start(self, index: int, total: int, topic: Topic) -> None: ...
    def step_log(self, step: str, logs: Mapping[str, float]) -> None: ...
    def step_end(self, topic: Topic, result: StepResult) -> None: ...
    def topic_end(self, topic: Topic, result: TopicResult) -> None: ...
    def recheck_end(self, topic: Topic, results: Mapping[str, Mapping[str, float]]) -> None: ...
    def run_end(self, summary: Mapping[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...
    def note(self, message: str) -> None: ...


class Console:
    """The events a person reads, handed to a :class:`Reporter` (``align.console.ConsoleReporter``)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def __call__(self, event: Any) -> None:
        reporter = self.reporter
        if isinstance(event, RunStarting):
            reporter.run_start(event.plan, event.output)
        elif isinstance(event, TopicStarted):
            reporter.topic_start(event.index, event.total, event.topic)
        elif isinstance(event, TrainerLogged):
            reporter.step_log(event.step, event.logs)
        elif isinstance(event, StepEnded):
            reporter.step_end(event.topic, event.result)
        elif isinstance(event, Rechecked):
            reporter.recheck_end(event.topic, event.results)
        elif isinstance(event, TopicEnded):
            reporter.topic_end(event.topic, event.result)
        elif isinstance(event, RunClosed):
            reporter.run_end(event.summary)
        elif isinstance(event, Warned):
            reporter.warning(event.message)
        elif isinstance(event, Noted):
            reporter.note(event.message)


class Hooks:
    """The plugins' lifecycle hooks, called through :class:`~align.plugins.lifecycle.Lifecycle`.

    Hooks run on the main process only (loggers and notifiers hear of the run once); what their
    failures do is decided on every process from the main one's broadcast list. A failure is
    recorded (a ``hook_error`` event) and named with its plugin, topic and step; then
    ``on_error`` decides, as for any plugin: ``skip`` warns and goes on, ``stop`` stops the run
    with everything so far saved.
    """

    def __init__(self, lifecycle: Lifecycle, engine: Engine):
        self.lifecycle = lifecycle
        #: The run: its bus, ``on_error``, ``status``, where it stands and how a stop is worded.
        self.engine = engine
        #: ``on_trainer_log`` hooks that raised during the step in progress: ``(plugin, message)``.
        self.trainer_log_failures: list[tuple[str, str]] = []

    def __call__(self, event: Any) -> None:
        hooks = self.lifecycle
        if isinstance(event, RunStarted):
            self._notify("on_run_start", lambda: hooks.on_run_start(event.plan, event.output))
        elif isinstance(event, TopicStarted):
            self._notify(
                "on_topic_start", lambda: hooks.on_topic_start(event.topic, event.index, event.total)
            )
        elif isinstance(event, TrainerLogged):
            if distributed.is_main():
                # Called inside the trainer: what the hook's failure does waits for the step's end,
                # so it never fails the training step it watches.
                muted = {plugin for plugin, _ in self.trainer_log_failures}
                failures = self._labelled(
                    "on_trainer_log",
                    hooks.on_trainer_log(event.topic, event.step, dict(event.logs), muted=muted),
                )
                self.trainer_log_failures.extend(failures)
        elif isinstance(event, StepEnded):
            if event.stops:
                self.trainer_log_failures = []  # the step's own failure is what stops the run
            result = event.result.as_dict()
            self._notify("on_step_end", lambda: hooks.on_step_end(event.topic, event.result.name, result))
            if not event.stops:
                # The step is checkpointed: decide on the on_trainer_log hooks that raised during it.
                failures, self.trainer_log_failures = self.trainer_log_failures, []
                self._decide(failures)
        elif isinstance(event, TopicEnded):
            result = event.result.as_dict()
            self._notify("on_topic_end", lambda: hooks.on_topic_end(event.topic, result))
        elif isinstance(event, RunEnded):
            self._notify("on_run_end", lambda: hooks.on_run_end(event.summary))

    def _notify(self, hook_name: str, call: Callable[[], list[HookFailure]]) -> None:
        failures: list[tuple[str, str]] = []
        if distributed.is_main():
            failures = self._labelled(hook_name, call())
        self._decide(failures)

    def _labelled(self, hook_name: str, failures: list[HookFailure]) -> list[tuple[str, str]]:
        """``(plugin, message)`` for each failure, each recorded as a ``hook_error`` event."""
        engine = self.engine
        labelled = []
        for failure in failures:
            labels = [
                f"{label} '{value}'"
                for label, value in (("topic", engine.current_topic), ("step", engine.current_step))
                if value
            ]
            where = f" ({', '.join(labels)})" if labels else ""
            message = f"plugin '{failure.plugin}' raised in {hook_name}{where}: {failure.error}"
            extra = {"plugin": failure.plugin, "hook": hook_name, "error": failure.error}
            engine.bus.emit(
                Recorded(engine.current_topic or "", engine.current_step or "", "hook_error", {}, extra)
            )
            labelled.append((failure.plugin, message))
        return labelled

    def _decide(self, failures: list[tuple[str, str]]) -> None:
        engine = self.engine
        # The same decision on every process.
        failures = [tuple(f) for f in distributed.broadcast_object(failures)]  # type: ignore[misc]
        if not failures:
            return
        if engine.on_error == "stop" and engine.status in ("running", "completed"):
            plugin, message = failures[0]
            if engine.status == "completed":
                raise RunStopped(
                    f"{message}; the run completed and its results are saved, or set on_error: skip"
                )
            raise engine.stopped(
                message, f"fix the plugin, or disable it with ALIGN_DISABLE_PLUGINS={plugin},"
            )
        for _, message in failures:  # on_error: skip, or the run is already stopping
            engine.bus.emit(Warned(message))
