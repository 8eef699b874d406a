"""``align eval``: score a saved adapter (or the bare model) on topics, as a run's evaluation step would."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align.core.topics import Topic
from align.errors import AlignError, ConfigError, closest
from align.tools.loading import load
from align.tools.runs import check_adapter, read_run_config, read_run_topics, run_of_adapter


def resolve_topics(
    topics: str | Path | None, adapter: str | Path | None, registry: Any = None
) -> list[Topic]:
    """``--topics`` when given (read with ``registry``'s topic sources), else the topics of the
    adapter's run (its ``topics.json``)."""
    from align.core.sources import TopicSources
    from align.core.topics import load_topics

    if topics is not None:
        return load_topics(topics, TopicSources.from_registry(registry) if registry is not None else None)
    run = run_of_adapter(adapter) if adapter is not None else None
    if run is None or not (run / "topics.json").is_file():
        raise ConfigError(
            "--topics: required here (no run with a topics.json holds the adapter); give a topic file or directory"
        )
    return read_run_topics(run)


def build_evaluators(
    registry: Any, names: Sequence[str], topics: Sequence[Topic], config: Mapping[str, Any] | None = None
) -> list[Any]:
    """Build the named evaluators from the plugin registry, as a run's evaluation step would.

    Each takes its params from ``config``'s section of its name (the adapter's run's), so it
    scores as it did in the run. Returns the plan's :class:`~align.core.plan.Component` s.
    """
    from align.core.plan import resolve_plan

    registered = registry.names("evaluator")
    if not names:
        raise ConfigError(f"--evaluators: give at least one evaluator (registered: {', '.join(registered)})")
    for name in names:
        if name not in registered:
            raise ConfigError(
                f"--evaluators: unknown evaluator '{name}'{closest(name, registered)} "
                f"(registered: {', '.join(registered) or 'none'}; `align plugins` lists them)"
            )
        for needed in getattr(registry.get("evaluator", name).factory, "requires", ()):
            for topic in topics:
                if not getattr(topic, needed, None):
                    raise ConfigError(
                        f"{topic.source}: {needed}: empty, but evaluator '{name}' needs it; add {needed} "
                        f"to the topic or leave '{name}' out of --evaluators"
                    )
    data: dict[str, Any] = {"protocol": [{"name": "eval", "evaluate": list(names)}]}
    for name in names:
        section = (config or {}).get(name)
        if isinstance(section, Mapping):
            data[name] = dict(section)
    plan = resolve_plan(data, "align eval", registry, topics=list(topics))
    return plan.steps[0].components


def evaluate_topics(
    language_model: Any, components: Sequence[Any], topics: Sequence[Topic], voice_set: str = "person"
) -> dict[str, dict[str, float]]:
    """``{topic: {"<evaluator>.<key>": value}}`` for every topic and evaluator; with ``voice_set:
    person``, each topic's voice is scored on every topic's voice pairs, as a run scores it."""
    from align.core.engine import prefix_metrics
    from align.core.replay import with_person_voice

    results: dict[str, dict[str, float]] = {}
    for topic in topics:
        metrics: dict[str, float] = {}
        scored = with_person_voice(topic, topics) if voice_set == "person" else topic
        for component in components:
            try:
                raw = component.instance.evaluate(language_model, scored)
                metrics.update(prefix_metrics(component.name, raw, f"evaluator '{component.name}'"))
            except Exception as exc:
                plugin = f" (plugin '{component.plugin}')" if component.plugin else ""
                raise AlignError(
                    f"topic '{topic.name}': evaluator '{component.name}'{plugin} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        results[topic.name] = metrics
    return results


def evaluate_adapter(
    registry: Any,
    *,
    adapter: str | Path | None = None,
    topics: str | Path | None = None,
    evaluators: Sequence[str] = ("quiz", "voice"),
    model: str | None = None,
) -> dict[str, Any]:
    """What ``align eval`` prints: the adapter (or the bare model) scored on every topic."""
    if adapter is not None:
        adapter = check_adapter(adapter)
    topic_list = resolve_topics(topics, adapter, registry)
    run = run_of_adapter(adapter) if adapter is not None else None
    config = read_run_config(run) if run is not None else None
    components = build_evaluators(registry, evaluators, topic_list, config)
    # A run recorded before voice_set existed scored each topic's voice on its own pairs.
    voice_set = config.get("voice_set", "topic") if config is not None else "person"
    loaded = load(adapter, model)
    scores = evaluate_topics(loaded.language_model(), components, topic_list, voice_set)
    return {
        "model": loaded.settings["path"],
        "adapter": str(adapter) if adapter is not None else None,
        "evaluators": list(evaluators),
        "topics": [{"topic": name, "metrics": metrics} for name, metrics in scores.items()],
    }


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def eval_table(result: Mapping[str, Any]) -> str:
    """``align eval``'s table: one block per topic, a metric a line."""
    lines = [f"model {result['model']}, adapter {result['adapter'] or 'none (the bare model)'}", ""]
    from align.console import column_width

    topic_width = column_width("topic", (entry["topic"] for entry in result["topics"]))
    metric_width = column_width("metric", (name for entry in result["topics"] for name in entry["metrics"]))
    header = f"{'topic':<{topic_width}}{'metric':<{metric_width}}{'value':>8}"
    lines += [header, "-" * len(header)]
    for entry in result["topics"]:
        for row, (name, value) in enumerate(entry["metrics"].items()):
            label = entry["topic"] if row == 0 else ""
            lines.append(f"{label:<{topic_width}}{name:<{metric_width}}{format_value(value):>8}")
    return "\n".join(lines)
