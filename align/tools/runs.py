"""Reading a run directory: the one reader ``align eval``, ``compare``, ``sample``, ``merge``,
``export``, ``chat``, ``report`` and the model card use.

A run leaves ``config.yaml``, ``topics.json``, ``summary.json``, ``metrics.jsonl`` and
``adapters/<topic>/``; each is read here, checked, and refused in one line naming the file when it
is missing or damaged. Nothing here writes into a run directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from align.core.topics import Topic
from align.errors import AlignError, closest

ADAPTER_CONFIG = "adapter_config.json"


def find_run(path: str | Path) -> Path:
    """``path`` as a run directory (one holding ``config.yaml`` or ``summary.json``)."""
    run = Path(path)
    if not run.exists():
        raise AlignError(
            f"{run}: run directory not found; give the directory `align run` wrote (runs/<name>)"
        )
    if not run.is_dir():
        raise AlignError(f"{run}: not a directory; give the run directory `align run` wrote (runs/<name>)")
    if not (run / "config.yaml").is_file() and not (run / "summary.json").is_file():
        raise AlignError(
            f"{run}: not a run directory (no config.yaml or summary.json); give the directory `align run` wrote"
        )
    return run


def _read_json(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise AlignError(f"{path}: not found; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AlignError(f"{path}: unreadable ({exc}); {fix}") from None


def read_summary(run: str | Path) -> dict[str, Any]:
    """A run's ``summary.json``; an error naming the file when the run has none."""
    run = find_run(run)
    summary = _read_json(
        run / "summary.json",
        "the run has not finished a topic yet (summary.json is written after each one); "
        "wait for it, or `align run --resume` it",
    )
    if not isinstance(summary, dict) or not isinstance(summary.get("topics"), list):
        raise AlignError(f"{run / 'summary.json'}: not an align summary (no 'topics' list)")
    check_summary(summary, run)
    return summary


def check_summary(summary: Mapping[str, Any], run: Path) -> None:
    """Refuse a ``summary.json`` whose entries ``compare`` and ``report`` read are not what a run
    writes (a topic without ``topic``, a metric ``"high"``, an adapter path out of the run)."""
    path = run / "summary.json"

    def bad(where: str, what: str) -> None:
        raise AlignError(f"{path}: {where}: {what}; the file is damaged: restore it from a copy of the run")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def text(value: Any) -> str:
        return json.dumps(value, ensure_ascii=True, default=str)[:80]

    def metrics(where: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            bad(where, f"expected a mapping of metric name to number, got {text(value)}")
        for name, metric in value.items():
            if metric is not None and not number(metric):
                bad(f"{where}[{text(name)}]", f"{text(metric)} is not a number")

    if "steps" in summary and (
        not isinstance(summary["steps"], list) or not all(isinstance(s, str) for s in summary["steps"])
    ):
        bad("steps", "expected a list of step names")
    if "seconds" in summary and not number(summary["seconds"]):
        bad("seconds", f"{text(summary['seconds'])} is not a number")
    root = run.resolve()
    for i, topic in enumerate(summary["topics"]):
        where = f"topics[{i}]"
        if not isinstance(topic, Mapping):
            bad(where, f"expected a mapping with 'topic' and 'steps', got {text(topic)}")
        if not isinstance(topic.get("topic"), str):
            bad(f"{where}.topic", "missing, or not a string naming the topic")
        adapter = topic.get("adapter")
        if adapter is not None:
            target = (run / adapter).resolve() if isinstance(adapter, str) and adapter else None
            if target is None or root not in target.parents:  # only adapters inside the run are read
                bad(f"{where}.adapter", f"{text(adapter)} is not a directory inside the run")
        steps = topic.get("steps")
        if not isinstance(steps, list):
            bad(f"{where}.steps", "missing, or not a list of steps")
        for j, step in enumerate(steps):
            at = f"{where}.steps[{j}]"
            if not isinstance(step, Mapping):
                bad(at, f"expected a mapping with step, kind, status and metrics, got {text(step)}")
            for key in ("step", "kind", "status"):
                if not isinstance(step.get(key), str):
                    bad(f"{at}.{key}", "missing, or not a string")
            metrics(f"{at}.metrics", step.get("metrics"))
            for key in ("gate", "rollback"):
                if step.get(key) is not None and not isinstance(step[key], Mapping):
                    bad(f"{at}.{key}", f"expected a mapping, got {text(step[key])}")
            gate = step.get("gate")
            decided = gate is not None and "gate" in gate
            if decided and (
                not isinstance(gate.get("passed"), bool) or not isinstance(gate.get("reason"), str)
            ):
                bad(f"{at}.gate", "expected 'passed' (true or false) and a 'reason'")
            rollback = step.get("rollback")
            if rollback is not None:
                for key in ("step", "reason"):
                    if not isinstance(rollback.get(key), str):
                        bad(f"{at}.rollback.{key}", "missing, or not a string")
                metrics(f"{at}.rollback.metrics", rollback.get("metrics", {}))
        recheck = topic.get("recheck") or {}
        if not isinstance(recheck, Mapping):
            bad(f"{where}.recheck", f"expected a mapping of topic to metrics, got {text(recheck)}")
        for target, values in recheck.items():
            metrics(f"{where}.recheck[{text(target)}]", values)


def read_run_config(run: str | Path) -> dict[str, Any] | None:
    """A run's recorded ``config.yaml`` as data, or ``None`` when it has none."""
    from align.core.topics import read_data_file

    path = Path(run) / "config.yaml"
    if not path.is_file():
        return None
    # Read as a config file is, bounded (aliases, depth, size): a run directory may be damaged.
    data = read_data_file(path, "config file", AlignError)
    if not isinstance(data, dict):  # the default model would stand in for the run's, without a word
        raise AlignError(
            f"{path}: holds {'nothing' if data is None else type(data).__name__}, not the run's config (a "
            "mapping of sections); the file is damaged: restore it from a copy of the run"
        )
    return data


def read_run_topics(run: str | Path) -> list[Topic]:
    """The topics a run trained on, from its ``topics.json``."""
    path = Path(run) / "topics.json"
    data = _read_json(path, "the run's topics are unknown; pass --topics with the topic files")
    try:
        return [Topic.from_dict(item, f"{path}[{i}]") for i, item in enumerate(data)]
    except (TypeError, ValueError) as exc:
        raise AlignError(f"{path}: unreadable ({exc}); pass --topics with the topic files") from None


def check_adapter(path: str | Path) -> Path:
    """``path`` as a saved adapter directory (PEFT: ``adapter_config.json`` + weights)."""
    adapter = Path(path)
    if not adapter.is_dir():
        raise AlignError(f"{adapter}: adapter directory not found; give a run's runs/<name>/adapters/<topic>")
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise AlignError(
            f"{adapter}: not an adapter directory (no {ADAPTER_CONFIG}); give a run's runs/<name>/adapters/<topic>"
        )
    return adapter


def run_of_adapter(adapter: str | Path) -> Path | None:
    """The run directory an adapter was saved in (``<run>/adapters/<topic>``), if it is in one."""
    adapter = Path(adapter).resolve()
    run = adapter.parent.parent
    if adapter.parent.name == "adapters" and (run / "config.yaml").is_file():
        return run
    return None


def run_adapter(run: str | Path, topic: str | None = None) -> Path:
    """The adapter of ``topic`` in a run, by default the last topic's (the run's final adapter)."""
    run = find_run(run)
    saved = sorted(p.name for p in (run / "adapters").glob("*") if (p / ADAPTER_CONFIG).is_file())
    if not saved:
        raise AlignError(
            f"{run}: no adapters saved yet (adapters/<topic>/); a run saves one after each topic"
        )
    if topic is None:
        order: list[str] = []
        if (run / "summary.json").is_file():
            order = [t["topic"] for t in read_summary(run)["topics"] if t.get("adapter")]
        elif (run / "topics.json").is_file():
            order = [t.name for t in read_run_topics(run)]
        done = [name for name in order if name in saved]
        topic = done[-1] if done else saved[-1]
    elif topic not in saved:
        raise AlignError(
            f"{run}: no adapter for topic '{topic}'{closest(topic, saved)} (saved: {', '.join(saved)}); "
            "pass one of them to --topic"
        )
    return run / "adapters" / topic


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
