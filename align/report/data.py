"""What the report shows, read out of a run's ``summary.json`` and ``metrics.jsonl`` events:
metrics per evaluation step, loss curves, each step's status, the forgetting matrix, and sample
answers from each topic's adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Voice prompts per topic answered in the report.
SAMPLE_PROMPTS = 2


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


def loss_curves(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{training step: {topic: [(optimizer step, loss)]}}`` from the ``log`` events."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for event in events:
        metrics = event.get("metrics") or {}
        if event.get("kind") == "log" and "loss" in metrics:
            points = curves.setdefault(event["step"], {}).setdefault(event["topic"], [])
            points.append((float(metrics.get("step", len(points) + 1)), float(metrics["loss"])))
    return curves


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


def sample_answers(
    run: Path, summary: Mapping[str, Any], max_new_tokens: int = 48
) -> dict[str, list[dict[str, str]]]:
    """For each topic with a saved adapter, its first voice prompts answered by the bare model
    and with the topic's adapter, beside the person's own answer (the voice pair's ``chosen``):
    ``{topic: [{prompt, bare, adapter, person}]}``."""
    from align.tools.loading import generate, load
    from align.tools.runs import read_run_topics

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
