"""The report's PNG plots, drawn with matplotlib's non-interactive Agg backend (the ``report`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.report.data import step_statuses

INSTALL = 'pip install "mindprint-align[report]"'
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
