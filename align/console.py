"""What ``align run`` prints: a line per step as it finishes, progress bars with ETA and the live
loss on a terminal (elsewhere a plain progress line now and then), and a table at the end."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from align.core.events import Reporter
from align.core.plan import Plan
from align.core.results import StepResult
from align.core.topics import Topic
from align.errors import printable

#: The metric the end-of-run table shows the forgetting matrix of.
FORGETTING_METRIC = "quiz.accuracy"
#: An earlier topic whose quiz accuracy fell by more than this since its own last evaluation is
#: flagged ``forgot`` in the end-of-run table.
FORGOT_THRESHOLD = 0.1


#: Off a terminal, a training step prints a progress line at most this often (seconds).
PROGRESS_INTERVAL = 30.0

#: The handler :func:`configure_logging` installs (replaced, not stacked, when called again).
_LOG_HANDLER_NAME = "align-console"


class _PrintableFormatter(logging.Formatter):
    """Log lines with the characters a terminal acts on escaped, as everything align prints."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def configure_logging(verbosity: int) -> None:
    """Set up the standard :mod:`logging` module for ``align run -v``: ``0`` leaves it alone
    (warnings only), ``1`` shows align's INFO messages (model load, adapter, steps with their
    durations), ``2`` or more align's DEBUG (checkpoints, adapters saved) and the libraries' INFO
    (transformers, TRL, PEFT). Messages go to stderr, apart from the run's own output."""
    if verbosity <= 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _LOG_HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_LOG_HANDLER_NAME)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    logging.getLogger("align").setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    if verbosity >= 2:
        for library in ("transformers", "trl", "peft"):
            logging.getLogger(library).setLevel(logging.INFO)


def _fmt(value: float | None) -> str:
    return "   -" if value is None else f"{value:4.2f}"


class ConsoleReporter(Reporter):
    """Prints the run as it goes.

    On a terminal: a progress bar over the topics and one over the optimizer steps of the training
    step in progress (ETA and the live loss), with a line per finished step above them. Elsewhere
    (a file, a pipe, CI): the lines, and during a training step a plain progress line (step k/n,
    loss, elapsed) every ``progress_interval`` seconds of ``clock``, so a log shows the run is
    alive. ``quiet``: nothing but warnings and errors (on stderr).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        quiet: bool = False,
        progress_interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.live = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.progress_interval = progress_interval
        self.clock = clock
        self._topics_bar: Any = None
        self._step_bar: Any = None
        self._step_bar_name: str | None = None
        # A step starts when the topic starts or the step before it ends.
        self._step_began = self._last_progress = clock()
        # The topics bar's ETA counts optimizer steps, measured in this process (so a resumed run
        # is not credited with the topics it did before): steps per training step, as last seen.
        self._train_steps: list[str] = []
        self._steps_of: dict[str, int] = {}
        self._topics_left = 0
        self._steps_done = 0
        self._started: float | None = None

    def _say(self, text: str) -> None:
        if not self.quiet:
            self._write(text, self.stream)

    def _write(self, text: str, stream: TextIO) -> None:
        """A line on ``stream``; while bars are up, above them (tqdm draws them again below).
        Names and values from configs, topics and plugins are shown escaped (:func:`printable`)."""
        text = printable(text)
        if self._topics_bar is not None or self._step_bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        else:
            stream.write(text + "\n")
        stream.flush()

    def _bar(self, **options: Any) -> Any:
        from tqdm import tqdm

        # disable=False: align sets TQDM_DISABLE to silence the libraries' own bars, not these.
        return tqdm(file=self.stream, disable=False, dynamic_ncols=True, **options)

    def _close_step_bar(self) -> None:
        if self._step_bar is not None:
            self._step_bar.close()
            self._step_bar = self._step_bar_name = None

    def run_start(self, plan: Plan, output: str) -> None:
        self._train_steps = [step.name for step in plan.steps if step.kind == "train"]
        steps = " → ".join(step.name for step in plan.steps)
        self._say(f"align: {len(plan.topics)} topics, model {plan.config['model']['path']}, output {output}")
        self._say(f"protocol: {steps}")
        lines, warnings = gates_in_questions(plan)
        for line in lines:
            self._say(f"  {line}")
        for warning in [*warnings, *settings_that_do_nothing(plan)]:
            self.warning(warning)

    def _step_begins(self) -> None:
        self._step_began = self._last_progress = self.clock()

    def topic_start(self, index: int, total: int, topic: Topic) -> None:
        self._say(f"[{index + 1}/{total}] {topic.name}")
        self._step_begins()
        self._topics_left = total - index - 1
        if self._started is None:
            self._started = self.clock()
        if not self.live:
            return
        if self._topics_bar is None:
            # tqdm's own ETA would count topics: none during the first, too little after a resume.
            self._topics_bar = self._bar(
                total=total,
                initial=index,
                unit="topic",
                position=0,
                desc=f"topic {topic.name}",
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        else:
            self._topics_bar.set_description_str(f"topic {topic.name}")

    def topic_end(self, topic: Topic, result: Any) -> None:
        self._close_step_bar()
        if self._topics_bar is not None:
            self._topics_bar.update(1)

    def step_log(self, step: str, logs: Mapping[str, float]) -> None:
        if self.quiet or "loss" not in logs:
            return
        done, total = int(logs.get("step", 0)), int(logs.get("max_steps", 0))
        if not self.live:
            now = self.clock()
            if now - self._last_progress >= self.progress_interval:
                self._last_progress = now
                of = f"/{total}" if total else ""
                self._say(
                    f"  {step}: step {done}{of}, loss {logs['loss']:.4f}, {now - self._step_began:.0f}s elapsed"
                )
            return
        if self._step_bar_name != step:
            self._close_step_bar()
            # One refresh per optimizer step (a trainer logs each one), however fast they come.
            self._step_bar = self._bar(
                total=total or None,
                unit="step",
                position=1,
                leave=False,
                mininterval=0,
                desc=printable(f"  {step}"),
            )
            self._step_bar_name = step
        self._step_bar.set_postfix_str(f"loss {logs['loss']:.4f}", refresh=False)
        self._steps_done += max(done - self._step_bar.n, 0)
        self._step_bar.update(done - self._step_bar.n)
        if total:
            self._steps_of[step] = total
        if self._topics_bar is not None and self._started is not None and self._steps_done:
            eta = self.eta_seconds(step, done)
            if eta is not None:
                self._topics_bar.set_postfix_str(f"ETA {self._topics_bar.format_interval(eta)}")

    def eta_seconds(self, step: str, done: int) -> float | None:
        """Seconds left in the run: the optimizer steps left (in this training step, the topic's
        later ones and the topics after it, each as many as last seen) at the time per step so far."""
        if self._started is None or not self._steps_done:
            return None
        later = self._train_steps[self._train_steps.index(step) + 1 :] if step in self._train_steps else []
        per_topic = sum(self._steps_of.get(name, 0) for name in self._train_steps)
        left = (
            max(self._steps_of.get(step, done) - done, 0)
            + sum(self._steps_of.get(name, 0) for name in later)
            + self._topics_left * per_topic
        )
        return left * (self.clock() - self._started) / self._steps_done

    def step_end(self, topic: Topic, result: StepResult) -> None:
        self._close_step_bar()
        self._step_begins()
        if result.status == "failed":
            reason = result.error["reason"] if result.error else ""
            self._say(f"  {result.name:<10} failed: {reason}")
            return
        if result.status == "skipped":
            reason = result.gate["reason"] if result.gate else ""
            self._say(f"  {result.name:<10} skipped: {reason}")
            return
        gate = f"  (gate passed: {result.gate['reason']})" if result.gate else ""
        if result.kind == "train":
            m = result.metrics
            prefix = next(iter(m), "x.").split(".")[0]
            parts = []
            if f"{prefix}.first_loss" in m and f"{prefix}.final_loss" in m:
                parts.append(f"loss {m[f'{prefix}.first_loss']:.3f} → {m[f'{prefix}.final_loss']:.3f}")
            if f"{prefix}.steps" in m:
                parts.append(f"{int(m[f'{prefix}.steps'])} steps")
            if f"{prefix}.reward_margin" in m:
                parts.append(f"reward margin {m[f'{prefix}.reward_margin']:.3f}")
            text = ", ".join(parts) or _metrics_text(m)
        else:
            text = _metrics_text(result.metrics)
        self._say(f"  {result.name:<10} {text}  [{result.seconds:.1f}s]{gate}")
        if result.rollback is not None:
            self._say(f"  {'':<10} rolled back: {result.rollback['reason']}")

    def recheck_end(self, topic: Topic, results: Mapping[str, Mapping[str, float]]) -> None:
        for row, (target, metrics) in enumerate(results.items()):
            self._say(f"  {'recheck' if row == 0 else '':<10} {target}: {_metrics_text(metrics)}")

    def warning(self, message: str) -> None:
        self._write(f"Warning: {message}", sys.stderr)

    def note(self, message: str) -> None:
        self._say(message)

    def run_end(self, summary: Mapping[str, Any]) -> None:
        self.close()
        if self.quiet:
            return
        self._say("")
        self._say(summary_table(summary))
        self._say(f"\nrun directory: {summary['output']} ({summary['seconds']:.0f}s)")

    def close(self) -> None:
        """Take the bars down (the run ended, or stopped)."""
        self._close_step_bar()
        if self._topics_bar is not None:
            self._topics_bar.close()
            self._topics_bar = None


def gates_in_questions(plan: Plan) -> tuple[list[str], list[str]]:
    """For each topic with a quiz, what the gates' :data:`FORGETTING_METRIC` thresholds and the
    rollback guards' tolerances mean in questions, and a warning for each topic whose quiz is too
    small for a guard: a single flipped answer is already a drop larger than the tolerance, so
    the guard undoes the step on noise. (With 6 questions, ``>= 0.70`` is 5 of 6.)"""
    metric = FORGETTING_METRIC
    rules = [
        rule
        for step in plan.steps
        if step.gate is not None
        for rule in getattr(step.gate.instance, "rules", [])
        if getattr(rule, "metric", None) == metric
    ]
    tolerances = [
        step.rollback.max_drop[metric]
        for step in plan.steps
        if step.rollback is not None and metric in step.rollback.max_drop
    ]
    lines: list[str] = []
    warnings: list[str] = []
    for topic in plan.topics:
        n = len(topic.quiz)
        if n == 0 or not (rules or tolerances):
            continue
        parts = [_rule_in_questions(rule.op, rule.value, n) for rule in rules]
        for tolerance in tolerances:
            flips = (
                math.floor(tolerance * n + 1e-9) + 1
            )  # the fewest answers whose loss is a drop > tolerance
            answers = "answer" if flips == 1 else "answers"
            parts.append(
                f"a rollback on a drop of more than {tolerance:.2f} triggers on {flips} flipped {answers}"
            )
            if flips == 1 and tolerance > 0:
                warnings.append(
                    f"{topic.source}: quiz: {n} questions are too few for the rollback guard on {metric}: "
                    f"one flipped answer is a drop of {1 / n:.2f}, more than its max_drop {tolerance:.2f}, "
                    f"so noise undoes the step; add quiz questions, or set max_drop {metric}: "
                    f"{math.ceil(100 / n) / 100:.2f} or more"
                )
        lines.append(f"{topic.name}: {n} quiz questions: " + "; ".join(parts))
    return lines, warnings


#: Below this, DPO's learning rate is known not to move a rank-1 adapter (docs/demo.md measures it).
DPO_LEARNING_RATE_THAT_MOVES = 1e-5


def settings_that_do_nothing(plan: Plan) -> list[str]:
    """A warning for each setting known to do nothing measurable (the seed's DPO learning rate of
    5e-7 on a rank-1 adapter), naming the measurement; once, however many steps use it."""
    if plan.config.get("lora", {}).get("rank") != 1:
        return []
    rates = {
        component.params.get("learning_rate")
        for step in plan.steps
        if step.kind == "train"
        for component in step.components
        if component.name == "dpo"
    }
    low = sorted(
        rate for rate in rates if isinstance(rate, (int, float)) and rate < DPO_LEARNING_RATE_THAT_MOVES
    )
    if not low:
        return []
    return [
        f"{plan.source}: dpo.learning_rate: {low[0]:g} is known not to move a rank-1 adapter: see docs/demo.md "
        f'("How the defaults were chosen"); the demo uses 5e-3'
    ]


def _rule_in_questions(op: str, value: float, n: int) -> str:
    """``quiz.accuracy >= 0.70`` for ``n`` questions: ``needs 5 of 6``."""
    rule = f"{FORGETTING_METRIC} {op} {value:.2f}"
    if op in (">=", ">"):
        least = math.ceil(value * n - 1e-9) if op == ">=" else math.floor(value * n + 1e-9) + 1
        least = max(least, 0)
        if least > n:
            return f"{rule} cannot pass with {n} questions"
        return f"{rule} needs {least} of {n}"
    most = math.floor(value * n + 1e-9) if op == "<=" else math.ceil(value * n - 1e-9) - 1
    if most < 0:
        return f"{rule} cannot pass with {n} questions"
    return f"{rule} allows at most {min(most, n)} of {n}"


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if not k.endswith(".margin"))


def column_width(header: str, entries: Iterable[str], gap: int = 2) -> int:
    """The width of a table column: its longest entry (or header) and ``gap`` spaces to the next,
    so that a long topic or metric name never runs into its neighbour."""
    return max([len(header), *(len(entry) for entry in entries)]) + gap


def summary_table(summary: Mapping[str, Any]) -> str:
    """Per topic and metric, the value after each evaluation step; then each gate's decision."""
    topics = summary["topics"]
    eval_steps = [s for s in summary["steps"] if any(_step(t, s, "eval") for t in topics)]
    # A metric row is (topic, metric, cells); a gate's or rollback's note under a topic is a string.
    body: list[tuple[str, str, list[str]] | str] = []
    for topic in topics:
        names: dict[str, None] = {}  # ordered, and a set (a list's membership test is quadratic)
        for step_name in eval_steps:
            step = _step(topic, step_name, "eval")
            for key in (step or {}).get("metrics", {}):
                if not key.endswith(".margin"):
                    names[key] = None
        for row, name in enumerate(names):
            cells = []
            for step_name in eval_steps:
                step = _step(topic, step_name, "eval")
                if step is None or step["status"] != "ran":
                    cells.append(step["status"] if step else "skipped")
                else:
                    cells.append(_fmt(step["metrics"].get(name)))
            body.append((topic["topic"] if row == 0 else "", name, cells))
        for step in topic["steps"]:
            if step.get("gate") and "gate" in step["gate"]:
                verdict = "ran" if step["gate"]["passed"] else "skipped"
                body.append(f"gate {step['step']}: {verdict} ({step['gate']['reason']})")
            if step.get("rollback"):
                body.append(f"rolled back {step['rollback']['step']}: {step['rollback']['reason']}")
    rows = [entry for entry in body if not isinstance(entry, str)]
    topic_width = column_width("topic", (t["topic"] for t in topics))
    metric_width = column_width("metric", (name for _, name, _ in rows))
    step_widths = [
        max(11, column_width(name, (cells[i] for _, _, cells in rows))) for i, name in enumerate(eval_steps)
    ]
    header = f"{'topic':<{topic_width}}{'metric':<{metric_width}}" + "".join(
        f"{name:>{width}}" for name, width in zip(eval_steps, step_widths)
    )
    lines = [header, "-" * len(header)]
    for entry in body:
        if isinstance(entry, str):
            lines.append(f"{'':<{topic_width}}{entry}")
            continue
        label, name, cells = entry
        lines.append(
            f"{label:<{topic_width}}{name:<{metric_width}}"
            + "".join(f"{cell:>{width}}" for cell, width in zip(cells, step_widths))
        )
    lines += forgetting_table(summary.get("forgetting"))
    return "\n".join(lines)


def forgetting_table(forgetting: Mapping[str, Any] | None) -> list[str]:
    """The forgetting matrix of :data:`FORGETTING_METRIC` (a row per topic trained, a column per
    topic measured), then each earlier topic's value now against its own last evaluation, flagged
    ``forgot`` when it fell by more than :data:`FORGOT_THRESHOLD`. Nothing before a second topic."""
    if not forgetting or FORGETTING_METRIC not in forgetting.get("metrics", {}):
        return []
    matrix = forgetting["metrics"][FORGETTING_METRIC]
    if len(matrix) < 2:
        return []
    names = forgetting["topics"][: len(matrix)]
    width = max(8, *(len(name) + 2 for name in names))
    label_width = column_width("after", names)
    lines = ["", f"forgetting: {FORGETTING_METRIC} of each topic (column) right after training each (row)"]
    header = f"{'after':<{label_width}}" + "".join(f"{name:>{width}}" for name in names)
    lines += [header, "-" * len(header)]
    for name, row in zip(names, matrix):
        cells = [_fmt(value).strip() if value is not None else "" for value in row[: len(names)]]
        lines.append((f"{name:<{label_width}}" + "".join(f"{cell:>{width}}" for cell in cells)).rstrip())
    last = len(matrix) - 1
    lines.append(
        f"since each topic's own last evaluation (a fall of more than {FORGOT_THRESHOLD:.2f} is flagged):"
    )
    for index, name in enumerate(names[:last]):
        own, now = matrix[index][index], matrix[last][index]
        if own is None or now is None:
            continue
        change = now - own
        forgot = ", forgot" if -change > FORGOT_THRESHOLD + 1e-9 else ""
        lines.append(f"{name:<{label_width}}{own:4.2f} -> {now:4.2f}  ({change:+.2f}{forgot})")
    acc = (forgetting.get("acc") or {}).get(FORGETTING_METRIC)
    bwt = (forgetting.get("bwt") or {}).get(FORGETTING_METRIC)
    if acc is not None and bwt is not None:
        lines.append(
            f"{FORGETTING_METRIC}: ACC {acc:.2f} (mean over topics, now), "
            f"BWT {bwt:+.2f} (mean change of earlier topics since their own training)"
        )
    return lines


def _step(topic: Mapping[str, Any], name: str, kind: str) -> dict[str, Any] | None:
    for step in topic["steps"]:
        if step["step"] == name and step["kind"] == kind:
            return step
    return None
