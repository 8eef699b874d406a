"""``align compare``: two runs' metrics side by side, with what their configs set differently."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align.errors import brief
from align.tools.evaluation import format_value
from align.tools.runs import read_run_config, read_summary


def _ordered_union(*sequences: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}  # ordered, and a set (a list's membership test is quadratic)
    for sequence in sequences:
        seen.update(dict.fromkeys(sequence))
    return list(seen)


def _steps_by_name(summary: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{topic: {step: entry}}`` from a summary."""
    return {t["topic"]: {s["step"]: s for s in t.get("steps", [])} for t in summary["topics"]}


def compare_runs(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Two runs' metrics side by side, per topic, step and metric, with ``diff = b - a``.

    A step that did not run in a run (skipped by its gate, failed, or not reached) has no value
    there, and its status is given instead.
    """
    summaries = [read_summary(a), read_summary(b)]
    steps = [_steps_by_name(s) for s in summaries]
    topics = _ordered_union(*(list(s) for s in steps))
    step_order = _ordered_union(*(s.get("steps", []) for s in summaries))
    rows: list[dict[str, Any]] = []
    for topic in topics:
        entries = [s.get(topic, {}) for s in steps]
        for step in _ordered_union(step_order, *(list(e) for e in entries)):
            pair = [e.get(step) for e in entries]
            if all(p is None for p in pair):
                continue
            metrics = [p["metrics"] if p and p.get("status") == "ran" else {} for p in pair]
            statuses = [p["status"] if p else "absent" for p in pair]
            names = _ordered_union(*(list(m) for m in metrics))
            if not names:
                if statuses[0] != statuses[1]:
                    rows.append(_row(topic, step, None, None, None, statuses))
                continue
            for name in names:
                rows.append(_row(topic, step, name, metrics[0].get(name), metrics[1].get(name), statuses))
    configs = [read_run_config(a), read_run_config(b)]
    return {
        "a": str(a),
        "b": str(b),
        "rows": rows,
        "config": config_differences(*configs) if None not in configs else None,
        "rolled_back": {"a": rollbacks(summaries[0]), "b": rollbacks(summaries[1])},
    }


#: Config keys that name a run rather than say how it ran: they differ between any two runs.
_RUN_IDENTITY_KEYS = ("name", "output")


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The settings two run configs give differently, as ``{key, a, b}`` with dotted keys (a
    protocol step by its name: ``protocol.after_dpo.rollback``); a key one lacks is ``None`` there."""
    flat = [_flatten({k: v for k, v in config.items() if k not in _RUN_IDENTITY_KEYS}) for config in (a, b)]
    keys = _ordered_union(list(flat[0]), list(flat[1]))
    return [
        {"key": key, "a": flat[0].get(key), "b": flat[1].get(key)}
        for key in keys
        if flat[0].get(key) != flat[1].get(key)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    named = isinstance(value, list) and value and all(isinstance(i, Mapping) and "name" in i for i in value)
    if named and len({str(item["name"]) for item in value}) == len(value):
        out = {}
        for item in value:
            rest = {k: v for k, v in item.items() if k != "name"}
            out.update(_flatten(rest, f"{prefix}{item['name']}."))
        return out
    return {prefix[:-1]: value}


def rollbacks(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The training steps a run rolled back: ``{topic, step, reason}``."""
    return [
        {
            "topic": topic["topic"],
            "step": str(step["rollback"].get("step")),
            "reason": str(step["rollback"].get("reason")),
        }
        for topic in summary["topics"]
        for step in topic["steps"]
        if isinstance(step.get("rollback"), Mapping)
    ]


def _row(
    topic: str, step: str, metric: str | None, a: float | None, b: float | None, statuses: list[str]
) -> dict[str, Any]:
    diff = b - a if a is not None and b is not None else None
    return {
        "topic": topic,
        "step": step,
        "metric": metric,
        "a": a,
        "b": b,
        "diff": diff,
        "a_status": statuses[0],
        "b_status": statuses[1],
    }


def compare_table(result: Mapping[str, Any]) -> str:
    """``align compare``'s table: a row per topic, step and metric; ``diff`` is b - a."""
    lines = [f"a: {result['a']}", f"b: {result['b']}", ""]
    from align.console import column_width

    rows = result["rows"]
    topic_width = column_width("topic", (row["topic"] for row in rows))
    step_width = column_width("step", (row["step"] for row in rows))
    metric_width = column_width("metric", (row["metric"] or "" for row in rows))
    header = f"{'topic':<{topic_width}}{'step':<{step_width}}{'metric':<{metric_width}}" + "".join(
        f"{name:>9}" for name in ("a", "b", "diff")
    )
    lines += [header, "-" * len(header)]
    last_topic = last_step = None
    for row in result["rows"]:
        topic = row["topic"] if row["topic"] != last_topic else ""
        step = row["step"] if (row["topic"], row["step"]) != (last_topic, last_step) else ""
        last_topic, last_step = row["topic"], row["step"]
        cells = []
        for side in ("a", "b"):
            value, status = row[side], row[f"{side}_status"]
            cells.append(format_value(value) if status == "ran" else status)
        diff = "" if row["diff"] is None else f"{row['diff']:+.2f}"
        lines.append(
            f"{topic:<{topic_width}}{step:<{step_width}}{row['metric'] or '':<{metric_width}}"
            f"{cells[0]:>9}{cells[1]:>9}{diff:>9}"
        )
    differences = result.get("config")
    lines.append("")
    if differences is None:
        lines.append("config: not compared (a run has no config.yaml)")
    elif not differences:
        lines.append("config: the same (apart from name and output)")
    else:
        lines.append("config: what differs (a -> b)")
        width = column_width("", (d["key"] for d in differences))
        for difference in differences:
            shown = ["(not set)" if difference[side] is None else brief(difference[side]) for side in "ab"]
            lines.append(f"  {difference['key']:<{width}}{shown[0]} -> {shown[1]}")
    for side in ("a", "b"):
        rolled = result.get("rolled_back", {}).get(side, [])
        if not rolled:
            lines.append(f"rolled back in {side}: none")
        for entry in rolled:
            lines.append(f"rolled back in {side}: {entry['topic']} {entry['step']} ({entry['reason']})")
    return "\n".join(lines)
