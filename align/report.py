"""``align report``: a run's results as ``report.md`` (and ``report.html``) with PNG plots.

Reads what the run left: ``summary.json`` (metrics per topic and step, gate decisions, the
forgetting matrix when there is one), the ``log`` events of ``metrics.jsonl`` (training loss)
and ``topics.json`` (held-out voice prompts, answered by the bare model and by each topic's
adapter). Plots are drawn with matplotlib's non-interactive Agg backend into ``plots/``; every
file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.rundir import atomic_write_text, staged_directory
from align.errors import AlignError

PLOTS = "plots"
INSTALL = 'pip install "mindprint-align[report]"'
#: Voice prompts per topic answered in the report.
SAMPLE_PROMPTS = 2
STATUS_COLORS = {"ran": "#4c9a2a", "skipped": "#bbbbbb", "failed": "#c0392b", "rolled back": "#e67e22"}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; a one-line error naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise AlignError(
            f"align report draws its plots with matplotlib, which is not installed; {INSTALL}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Report:
    """The report as blocks (``("h2", text)``, ``("p", text)``, ``("img", file, alt)`` …), rendered
    to Markdown and to self-contained HTML."""

    blocks: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, kind: str, *parts: str) -> None:
        self.blocks.append((kind, *parts))

    def markdown(self) -> str:
        out = []
        for kind, *parts in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append(f"{'#' * int(kind[1])} {parts[0]}")
            elif kind == "p":
                out.append(parts[0])
            elif kind == "pre":
                out.append(f"```\n{parts[0]}\n```")
            elif kind == "img":
                out.append(f"![{parts[1]}]({PLOTS}/{parts[0]})")
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in parts))
            elif kind == "quote":
                out.append(
                    f"{parts[0]}\n\n"
                    + "\n".join(f"> {line}" for line in (parts[1] or "(empty)").splitlines())
                )
            elif kind == "table":
                rows = [row.split("\t") for row in parts]
                lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
                lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def html(self, plots: Path, title: str) -> str:
        esc = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title>",
            # The metrics block wraps instead of scrolling sideways (a scroll bar hid its rollback
            # line); plots take the page's width.
            "<style>body{font-family:sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem}"
            "img{display:block;width:100%;height:auto}"
            "pre{background:#f4f4f4;padding:.5rem;font-size:.8rem;white-space:pre-wrap;overflow-wrap:anywhere}"
            "blockquote{border-left:3px solid #ccc;margin:0 0 1rem;padding-left:.75rem;white-space:pre-wrap}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}"
            "</style></head><body>",
        ]
        for kind, *parts in self.blocks:
            if kind in ("h1", "h2", "h3"):
                out.append(f"<{kind}>{esc(parts[0])}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{esc(parts[0])}</p>")
            elif kind == "pre":
                out.append(f"<pre>{esc(parts[0])}</pre>")
            elif kind == "img":
                data = base64.b64encode((plots / parts[0]).read_bytes()).decode("ascii")
                out.append(f'<p><img alt="{esc(parts[1])}" src="data:image/png;base64,{data}"></p>')
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in parts) + "</ul>")
            elif kind == "quote":
                out.append(f"<p>{esc(parts[0])}</p><blockquote>{esc(parts[1] or '(empty)')}</blockquote>")
            elif kind == "table":
                rows = [row.split("\t") for row in parts]
                head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
                body = "".join(
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
                )
                out.append(f"<table><tr>{head}</tr>{body}</table>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def read_events(run: Path) -> list[dict[str, Any]]:
    """The events of ``metrics.jsonl`` (none when it is missing; a torn or damaged line is left out)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_bytes().splitlines():
        try:  # a line that is no UTF-8 or no JSON (torn, or damaged) is left out
            event = json.loads(line.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


# -- plots --------------------------------------------------------------------------------------
def _eval_steps(summary: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for topic in summary["topics"]:
        for step in topic["steps"]:
            if step["kind"] == "eval" and step["status"] == "ran" and step["step"] not in names:
                names.append(step["step"])
    return names


def eval_metrics(summary: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{metric: {step: {topic: value}}}`` for every evaluation step that ran."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for topic in summary["topics"]:
        for step in topic["steps"]:
            if step["kind"] != "eval" or step["status"] != "ran":
                continue
            for name, value in step["metrics"].items():
                table.setdefault(name, {}).setdefault(step["step"], {})[topic["topic"]] = value
    return table


def plot_metric(
    plt: Any, metric: str, values: Mapping[str, Mapping[str, float]], topics: list[str], path: Path
) -> None:
    """Grouped bars: a group per topic, a bar per evaluation step (before, after_sft, …)."""
    steps = list(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(topics) + 2), 3.6))
    width = 0.8 / max(1, len(steps))
    for k, step in enumerate(steps):
        xs = [i + (k - (len(steps) - 1) / 2) * width for i, t in enumerate(topics) if t in values[step]]
        ys = [values[step][t] for t in topics if t in values[step]]
        bars = ax.bar(xs, ys, width=width, label=step, edgecolor="black", linewidth=0.6)
        # A value of 0 is a bar of no height: its label (and outline) shows it was measured.
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    measured = [value for by_topic in values.values() for value in by_topic.values()]
    if measured and min(measured) >= 0.0 and max(measured) <= 1.0:
        ax.set_ylim(0.0, 1.12)  # a score in [0, 1]: the whole scale, room for the labels
    ax.set_xticks(range(len(topics)), topics)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per topic, before and after")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize="small")
    _save(plt, fig, path)


def loss_curves(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{training step: {topic: [(optimizer step, loss)]}}`` from the ``log`` events."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for event in events:
        metrics = event.get("metrics") or {}
        if event.get("kind") == "log" and "loss" in metrics:
            points = curves.setdefault(event["step"], {}).setdefault(event["topic"], [])
            points.append((float(metrics.get("step", len(points) + 1)), float(metrics["loss"])))
    return curves


def plot_losses(plt: Any, curves: Mapping[str, Mapping[str, list[tuple[float, float]]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves) + 0.5, 3.4), squeeze=False)
    for ax, (step, by_topic) in zip(axes[0], curves.items()):
        for topic, points in by_topic.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=topic)
        ax.set_title(f"{step} loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    _save(plt, fig, path)


def step_statuses(summary: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[str]]]:
    """Topics, steps and each topic's status per step (ran, skipped, failed, rolled back, or "")."""
    topics = [t["topic"] for t in summary["topics"]]
    steps = list(summary.get("steps") or [])
    for topic in summary["topics"]:
        steps += [s["step"] for s in topic["steps"] if s["step"] not in steps]
    grid = []
    for topic in summary["topics"]:
        by_step = {s["step"]: s for s in topic["steps"]}
        rolled = {s["rollback"]["step"] for s in topic["steps"] if s.get("rollback")}
        grid.append(
            [
                "rolled back" if name in rolled else by_step[name]["status"] if name in by_step else ""
                for name in steps
            ]
        )
    return topics, steps, grid


def plot_gates(plt: Any, summary: Mapping[str, Any], path: Path) -> None:
    """The gate timeline: a row per topic, a cell per step, coloured by what happened; a gated
    step is labelled with its gate's verdict."""
    from matplotlib.patches import Patch

    topics, steps, grid = step_statuses(summary)
    gated = {
        (t["topic"], s["step"]): s["gate"]["passed"]
        for t in summary["topics"]
        for s in t["steps"]
        if s.get("gate") and "gate" in s["gate"]
    }
    # The topic names sit left of the cells: a long one took the cells' width.
    names = 0.09 * max((len(topic) for topic in topics), default=0)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(steps) + 3.0) + names, 0.6 * len(topics) + 1.6))
    for i, topic in enumerate(topics):
        for j, step in enumerate(steps):
            status = grid[i][j]
            ax.add_patch(plt.Rectangle((j, i), 0.95, 0.9, color=STATUS_COLORS.get(status, "#ffffff")))
            label = status or "-"
            if (topic, step) in gated:
                label = "gate: ran" if gated[(topic, step)] else "gate: skipped"
            ax.text(j + 0.475, i + 0.45, label, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(steps))
    ax.set_ylim(len(topics), 0)
    ax.set_xticks([j + 0.475 for j in range(len(steps))], steps)
    ax.set_yticks([i + 0.45 for i in range(len(topics))], topics)
    ax.set_title("steps per topic (gated steps: the gate's verdict)")
    handles = [Patch(color=color, label=status) for status, color in STATUS_COLORS.items()]
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(plt, fig, path)


def check_forgetting(data: Any) -> tuple[list[str], dict[str, list[list[float | None]]]]:
    """``summary["forgetting"]`` checked: topics, and per metric an n x n lower-triangular matrix."""
    if not isinstance(data, Mapping) or not isinstance(data.get("topics"), list):
        raise ValueError("expected {topics: [...], metrics: {name: matrix}}")
    topics = [str(t) for t in data["topics"]]
    metrics = data.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError("'metrics' must map a metric name to a matrix")
    n = len(topics)
    for name, matrix in metrics.items():
        if (
            not isinstance(matrix, list)
            or len(matrix) > n  # a row per trained topic: a run that stopped early has fewer
            or any(not isinstance(r, list) or len(r) != n for r in matrix)
        ):
            raise ValueError(
                f"metrics.{name}: expected up to {n} rows of {n} values (a row per trained topic)"
            )
    return topics, {str(k): v for k, v in metrics.items()}


def plot_forgetting(
    plt: Any, metric: str, topics: list[str], matrix: list[list[float | None]], path: Path
) -> None:
    """Heat map: row i is the model right after training topic i, column j topic j's metric."""
    import numpy as np

    values = np.ma.masked_invalid(
        np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    )
    size = 1.0 * len(topics) + 2.5
    names = 0.09 * max((len(topic) for topic in topics), default=0)  # the row labels, left of the cells
    fig, ax = plt.subplots(figsize=(size + 1 + names, size))
    known = values.compressed()
    low, high = (min(0.0, float(known.min())), max(1.0, float(known.max()))) if known.size else (0.0, 1.0)
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                color = label_color(image.cmap(image.norm(value)))
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(topics)), topics, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"after {t}" for t in topics[: len(matrix)]])
    ax.set_xlabel("topic evaluated")
    ax.set_title(f"forgetting: {metric}")
    fig.colorbar(image, ax=ax)
    _save(plt, fig, path)


def label_color(rgba: Sequence[float]) -> str:
    """Black or white text, whichever contrasts more with the cell (WCAG's relative luminance):
    viridis ends in yellow, where the white labels were unreadable."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "white"


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    # "tight": the saved image holds every label, title and colour bar (long names pushed them out).
    fig.savefig(path, format="png", dpi=150, bbox_inches="tight")  # sharp at the page's full width
    plt.close(fig)


# -- samples ------------------------------------------------------------------------------------
def sample_answers(
    run: Path, summary: Mapping[str, Any], max_new_tokens: int = 48
) -> dict[str, list[dict[str, str]]]:
    """For each topic with a saved adapter, its first voice prompts answered by the bare model
    and with the topic's adapter, beside the person's own answer (the voice pair's ``chosen``):
    ``{topic: [{prompt, bare, adapter, person}]}``."""
    from align.tools import generate, load, read_run_topics

    topics = {t.name: t for t in read_run_topics(run)}
    wanted = [
        (t["topic"], run / t["adapter"])
        for t in summary["topics"]
        if t.get("adapter") and t["topic"] in topics and topics[t["topic"]].voice_pairs
    ]
    if not wanted:
        return {}
    loaded = load(wanted[0][1])
    answers: dict[str, list[dict[str, str]]] = {}
    for index, (topic, adapter) in enumerate(wanted):
        if index:  # the first is attached by load(); each added one becomes the active adapter
            loaded.add_adapter(adapter, f"topic{index}")
        pairs = topics[topic].voice_pairs[:SAMPLE_PROMPTS]
        prompts = [pair.prompt for pair in pairs]
        tuned = generate(loaded, prompts, max_new_tokens=max_new_tokens)
        with loaded.bare():
            bare = generate(loaded, prompts, max_new_tokens=max_new_tokens)
        answers[topic] = [
            {"prompt": pair.prompt, "bare": b, "adapter": a, "person": pair.chosen}
            for pair, b, a in zip(pairs, bare, tuned)
        ]
    return answers


# -- the report ---------------------------------------------------------------------------------
def write_report(run: str | Path, *, html_report: bool = False, samples: bool = True) -> list[Path]:
    """Write ``report.md`` (and ``report.html``) and ``plots/*.png`` into the run directory;
    returns the files written."""
    from align.console import summary_table
    from align.tools import find_run, read_run_config, read_summary

    plt = pyplot()
    run = find_run(run)
    summary = read_summary(run)
    config = read_run_config(run) or {}
    model = (config.get("model") or {}).get("path", "?") if isinstance(config.get("model"), Mapping) else "?"
    report = Report()
    topics = [t["topic"] for t in summary["topics"]]
    report.add("h1", f"Report: {run.name}")
    report.add(
        "p",
        f"Status {summary.get('status', '?')}, {len(topics)} topics ({', '.join(topics)}), model {model}, "
        f"seed {summary.get('seed', '?')}, {float(summary.get('seconds', 0)):.0f} s.",
    )
    with staged_directory(run / PLOTS, replace=True, readable=True) as staging:
        report.add("h2", "Metrics before and after")
        if summary["topics"]:
            report.add("pre", summary_table(summary))
        by_metric = eval_metrics(summary)
        for metric, values in by_metric.items():
            file = f"metric_{_file_name(metric)}.png"
            plot_metric(plt, metric, values, topics, staging / file)
            report.add("img", file, f"{metric} per topic and evaluation step")
        if not by_metric:
            report.add("p", "No evaluation step ran yet.")

        report.add("h2", "Training loss")
        curves = loss_curves(read_events(run))
        if curves:
            plot_losses(plt, curves, staging / "loss.png")
            report.add("img", "loss.png", "loss per optimizer step, per training step and topic")
        else:
            report.add("p", "No training logs in metrics.jsonl (no training step logged a loss).")

        generated = [e for e in read_events(run) if e.get("kind") == "generated"]
        if generated:
            report.add("h2", "Generated answers")
            report.add(
                "p",
                "The model's own answers, used as the rejected answers of pairs that had none (or of "
                "all pairs, with dpo.rejected: policy), as recorded in metrics.jsonl.",
            )
            for event in generated:
                where = (
                    f"{event.get('topic')}, step {event.get('step')}"
                    if event.get("topic")
                    else "before training, from the bare model"
                )
                what = "voice pairs" if event.get("purpose") == "voice_rejected" else "preference pairs"
                report.add("h3", f"{what}: {where}")
                rows = [
                    f"{_cell(a.get('prompt'))}\t{_cell(a.get('answer'))}"
                    for a in event.get("answers") or []
                    if isinstance(a, Mapping)
                ]
                report.add("table", "prompt\tgenerated answer", *rows)

        report.add("h2", "Gates")
        if summary["topics"]:
            plot_gates(plt, summary, staging / "gates.png")
            report.add("img", "gates.png", "which steps ran, and what each gate decided, per topic")
        decisions = [
            f"{t['topic']}: {s['step']} {'ran' if s['gate']['passed'] else 'skipped'} ({s['gate']['reason']})"
            for t in summary["topics"]
            for s in t["steps"]
            if s.get("gate") and "reason" in s["gate"]
        ]
        decisions += [
            f"{t['topic']}: {s['rollback']['step']} rolled back ({s['rollback']['reason']})"
            for t in summary["topics"]
            for s in t["steps"]
            if s.get("rollback")
        ]
        report.add(*(("list", *decisions) if decisions else ("p", "No step had a gate.")))

        report.add("h2", "Forgetting")
        _forgetting(plt, report, summary.get("forgetting"), staging)

        if samples:
            report.add("h2", f"Samples: the first {SAMPLE_PROMPTS} held-out voice prompts of each topic")
            if not (run / "topics.json").is_file():
                report.add("p", "No topics.json in the run, so no voice prompts to answer.")
            else:
                answers = sample_answers(run, summary)
                for topic, rows in answers.items():
                    report.add("h3", topic)
                    for row in rows:
                        report.add("p", f"Prompt: {row['prompt']}")
                        report.add("quote", flagged("bare model", row["bare"]), row["bare"])
                        report.add(
                            "quote", flagged(f"with the {topic} adapter", row["adapter"]), row["adapter"]
                        )
                        report.add("quote", "the person (held out, never trained on):", row["person"])
                if not answers:
                    report.add("p", "No topic has both a saved adapter and voice pairs.")

    written = sorted((run / PLOTS).iterdir())  # a plot that no longer applies went with the old ones
    atomic_write_text(run / "report.md", report.markdown())
    written.append(run / "report.md")
    if html_report:
        atomic_write_text(run / "report.html", report.html(run / PLOTS, f"align report: {run.name}"))
        written.append(run / "report.html")
    return written


def _cell(text: Any) -> str:
    """``text`` as one table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "/").replace("\t", " ")


def flagged(title: str, answer: str) -> str:
    """A sample's heading, with a word when the answer loops (as the style evaluator counts it)."""
    from align.tools import repetition_note

    note = repetition_note(answer)
    return f"{title} ({note}):" if note else f"{title}:"


def _forgetting(plt: Any, report: Report, data: Any, staging: Path) -> None:
    if data is None:
        report.add("p", "summary.json has no forgetting matrix (an older align wrote this run); no heat map.")
        return
    try:
        topics, metrics = check_forgetting(data)
    except ValueError as exc:
        report.add("p", f"summary.json forgetting is malformed ({exc}); no heat map.")
        return
    report.add(
        "p",
        "Row i: the model right after training topic i; column j: topic j's metric then (blank: not trained yet).",
    )
    for metric, matrix in metrics.items():
        file = f"forgetting_{_file_name(metric)}.png"
        plot_forgetting(plt, metric, topics, matrix, staging / file)
        report.add("h3", metric)
        report.add("img", file, f"forgetting matrix of {metric}")
        rows = ["after \\ topic\t" + "\t".join(topics)]
        for topic, row in zip(topics, matrix):
            rows.append(f"{topic}\t" + "\t".join("" if v is None else f"{v:.2f}" for v in row))
        report.add("table", *rows)
