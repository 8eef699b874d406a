"""``align report``: a run's results as ``report.md`` (and ``report.html``) with PNG plots.

Reads what the run left, through the run reader (:mod:`align.tools.runs`): ``summary.json``
(metrics per topic and step, gate decisions, the forgetting matrix when there is one), the ``log``
events of ``metrics.jsonl`` (training loss) and ``topics.json`` (held-out voice prompts, answered
by the bare model and by each topic's adapter). :mod:`~align.report.data` picks out what is shown,
:mod:`~align.report.plots` draws it with matplotlib's non-interactive Agg backend into ``plots/``,
:mod:`~align.report.render` writes the Markdown and HTML; every file is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from align.core.rundir import atomic_write_text, staged_directory
from align.report.data import (
    SAMPLE_PROMPTS,
    check_forgetting,
    eval_metrics,
    loss_curves,
    sample_answers,
    step_statuses,
)
from align.report.plots import (
    INSTALL,
    STATUS_COLORS,
    label_color,
    plot_forgetting,
    plot_gates,
    plot_losses,
    plot_metric,
    pyplot,
)
from align.report.render import PLOTS, Report, file_name, flagged, table_cell
from align.tools.runs import find_run, read_events, read_run_config, read_summary

__all__ = [
    "INSTALL",
    "PLOTS",
    "SAMPLE_PROMPTS",
    "STATUS_COLORS",
    "Report",
    "check_forgetting",
    "eval_metrics",
    "file_name",
    "flagged",
    "label_color",
    "loss_curves",
    "plot_forgetting",
    "plot_gates",
    "plot_losses",
    "plot_metric",
    "pyplot",
    "read_events",
    "sample_answers",
    "step_statuses",
    "table_cell",
    "write_report",
]


def write_report(run: str | Path, *, html_report: bool = False, samples: bool = True) -> list[Path]:
    """Write ``report.md`` (and ``report.html``) and ``plots/*.png`` into the run directory;
    returns the files written."""
    from align.console import summary_table

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
            file = f"metric_{file_name(metric)}.png"
            plot_metric(plt, metric, values, topics, staging / file)
            report.add("img", file, f"{metric} per topic and evaluation step")
        if not by_metric:
            report.add("p", "No evaluation step ran yet.")

        report.add("h2", "Training loss")
        events = read_events(run)
        curves = loss_curves(events)
        if curves:
            plot_losses(plt, curves, staging / "loss.png")
            report.add("img", "loss.png", "loss per optimizer step, per training step and topic")
        else:
            report.add("p", "No training logs in metrics.jsonl (no training step logged a loss).")

        generated = [e for e in events if e.get("kind") == "generated"]
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
                    f"{table_cell(a.get('prompt'))}\t{table_cell(a.get('answer'))}"
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
        file = f"forgetting_{file_name(metric)}.png"
        plot_forgetting(plt, metric, topics, matrix, staging / file)
        report.add("h3", metric)
        report.add("img", file, f"forgetting matrix of {metric}")
        rows = ["after \\ topic\t" + "\t".join(topics)]
        for topic, row in zip(topics, matrix):
            rows.append(f"{topic}\t" + "\t".join("" if v is None else f"{v:.2f}" for v in row))
        report.add("table", *rows)
