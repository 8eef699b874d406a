"""After a run: score a saved adapter, compare two runs, sample from an adapter, merge it.

What ``align eval``, ``align compare``, ``align sample`` and ``align merge`` do; ``align report``
lives in :mod:`align.report` and reuses the reading and loading here. Everything reads what a run
left (``config.yaml``, ``topics.json``, ``summary.json``, ``adapters/<topic>/``) and nothing here
writes into a run directory. Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.topics import Topic
from align.errors import AlignError, ConfigError, ModelError, brief, closest

ADAPTER_CONFIG = "adapter_config.json"


def default_model_settings() -> dict[str, Any]:
    """The model settings an adapter is loaded with when its run recorded none: the config's."""
    from align.core.config import BASE_DEFAULTS

    return dict(BASE_DEFAULTS["model"])


# -- reading a run ------------------------------------------------------------------------------
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


def model_settings(adapter: str | Path | None = None, model: str | None = None) -> dict[str, Any]:
    """The ``model:`` settings to load with: the adapter's run's (``config.yaml``), else the
    packaged default; ``model`` (``--model``) replaces the path only."""
    settings = default_model_settings()
    run = run_of_adapter(adapter) if adapter is not None else None
    if run is not None:
        recorded = (read_run_config(run) or {}).get("model")
        if isinstance(recorded, Mapping):
            settings.update(recorded)
    if model is not None:
        settings["path"] = str(Path(model).resolve()) if Path(model).exists() else model
    return settings


# -- loading a model with an adapter ------------------------------------------------------------
@dataclass
class LoadedModel:
    """The base model (with the adapter attached as ``adapter_name``, when there is one)."""

    model: Any
    tokenizer: Any
    settings: dict[str, Any]
    adapters: dict[str, Path] = field(default_factory=dict)

    def language_model(self) -> Any:
        """The model as the :class:`align.LanguageModel` evaluators score (align's chat template use)."""
        from align.core.model import HFLanguageModel

        chat = self.settings.get("chat_template", "auto")
        return HFLanguageModel(
            self.model,
            self.tokenizer,
            batch_size=int(self.settings.get("eval_batch_size", 16)),
            chat_template=chat if isinstance(chat, bool) else None,
        )

    def add_adapter(self, adapter: str | Path, name: str = "default") -> None:
        """Attach a saved adapter (the first one wraps the model in a PEFT model) and make it active."""
        from peft import PeftModel
        from safetensors import SafetensorError

        adapter = check_adapter(adapter)
        try:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
            else:
                self.model.load_adapter(str(adapter), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(
                f"{adapter}: does not fit the model {self.settings['path']} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass the --model "
                "the run trained on (its config.yaml model.path)"
            ) from None
        except (SafetensorError, OSError) as exc:  # cut short, overwritten, or a link to another file
            raise ModelError(
                f"{adapter}: the adapter's weights could not be read ({str(exc).splitlines()[0] if str(exc) else ''}); "
                "the file is damaged: save the adapter again, or restore it from a copy of the run"
            ) from None
        self.model.set_adapter(name)
        self.model.eval()
        self.adapters[name] = adapter

    @contextlib.contextmanager
    def bare(self) -> Iterator[None]:
        """The base model without any adapter, for as long as the context lasts."""
        if not self.adapters:
            yield
            return
        with self.model.disable_adapter():
            yield


def load(
    adapter: str | Path | None = None, model: str | None = None, *, full_precision: bool = False
) -> LoadedModel:
    """Load the base model (the adapter's run's, ``model``, or the packaged default) and attach
    ``adapter`` when given. Errors are one-line :class:`ModelError` s.

    ``full_precision`` loads the base weights unquantized and on one device whatever the run used
    (4-bit training, ``device_map``): what merging needs."""
    from align.core.model import load_model
    from align.core.runner import quiet_libraries

    if adapter is not None:
        adapter = check_adapter(adapter)
    settings = model_settings(adapter, model)
    if full_precision:
        settings.update(quantization="none", device_map=None)
    quiet_libraries()
    base, tokenizer = load_model(
        settings["path"],
        dtype=settings["dtype"],
        trust_remote_code=bool(settings["trust_remote_code"]),
        chat_template=settings.get("chat_template", "auto"),
        quantization=settings.get("quantization", "none"),
        device_map=settings.get("device_map"),
    )
    base.eval()
    loaded = LoadedModel(base, tokenizer, settings)
    if adapter is not None:
        loaded.add_adapter(adapter)
    return loaded


def check_generation_options(
    max_new_tokens: int, temperature: float, repetition_penalty: float = 1.0
) -> None:
    if not math.isfinite(temperature):
        raise AlignError(f"--temperature: must be a finite number (got {temperature})")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise AlignError(
            f"--repetition-penalty: must be a number > 0 (got {repetition_penalty}); 1 is none, "
            "1.1 to 1.5 discourage repeating what the answer already said"
        )
    if temperature < 0:
        raise AlignError(f"--temperature: must be >= 0 (got {temperature}); 0 is greedy")
    if max_new_tokens < 1:
        raise AlignError(f"--max-new-tokens: must be >= 1 (got {max_new_tokens})")


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Answer each prompt as a user turn of the chat template (as align scores it).

    Greedy (deterministic) at ``temperature`` 0; above it, sampled from a generator seeded with
    ``seed`` before each prompt, so the same call gives the same answers. One prompt at a time,
    so no padding can change an answer. ``repetition_penalty`` above 1 makes tokens the answer
    (or the prompt) already holds less likely (transformers' CTRL-style penalty).
    """
    import torch

    check_generation_options(max_new_tokens, temperature, repetition_penalty)
    language_model = loaded.language_model()
    device = next(loaded.model.parameters()).device
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = float(repetition_penalty)
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([language_model.prompt_ids(prompt)], dtype=torch.long, device=device)
            torch.manual_seed(seed)
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
                **options,
            )
            answers.append(loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


# -- align eval ---------------------------------------------------------------------------------
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


def _fmt(value: float | None) -> str:
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
            lines.append(f"{label:<{topic_width}}{name:<{metric_width}}{_fmt(value):>8}")
    return "\n".join(lines)


# -- align compare ------------------------------------------------------------------------------
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
            cells.append(_fmt(value) if status == "ran" else status)
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


# -- align sample -------------------------------------------------------------------------------
def sample(
    adapter: str | Path,
    prompt: str,
    *,
    base: bool = False,
    model: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    repetition_penalty: float = 1.0,
) -> dict[str, str]:
    """The answer to ``prompt`` with the adapter attached, and the bare model's with ``base``."""
    check_generation_options(max_new_tokens, temperature, repetition_penalty)
    loaded = load(adapter, model)
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
    }
    answers = {"adapter": generate(loaded, [prompt], **options)[0]}
    if base:
        with loaded.bare():
            answers["base"] = generate(loaded, [prompt], **options)[0]
    return answers


def repetition_note(answer: str) -> str | None:
    """A word for an answer that loops (a phrase said over and over, as a model stuck in a loop
    does until the token limit): the style evaluator's own test for a degenerate answer."""
    from align.evaluators.style import repeats

    if not repeats(answer):
        return None
    return "repeats itself (a word or phrase loops), which is not the person's voice"


# -- align merge --------------------------------------------------------------------------------
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


def check_empty_output(output: str | Path) -> Path:
    """Refuse an output path that is a file or a directory with anything in it."""
    output = Path(output)
    if output.is_symlink():  # to a directory, or to nothing: the rename into place would replace the link
        target = os.readlink(output)
        raise AlignError(
            f"{output}: a link to {target}; give a directory (new or empty) itself as --output, not a link"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AlignError(f"{output}: output exists and is not empty; choose another --output or remove it")
    return output


def merge(adapter: str | Path, output: str | Path, *, model: str | None = None) -> Path:
    """Merge a saved adapter (:func:`run_adapter` finds a run's) into its base model and save a
    standalone Hugging Face model.

    The directory holds safetensors weights, the config, the generation config, the
    tokenizer with its chat template and a model card (``README.md``); ``AutoModelForCausalLM.from_pretrained`` loads it. It is
    written into a staging directory beside ``output`` and renamed into place, so ``output`` is
    either absent or complete.
    """
    from align.card import run_card
    from align.core.model import safetensors_os_errors
    from align.core.rundir import staged_directory

    output = check_empty_output(output)
    loaded = load(adapter, model, full_precision=True)  # a QLoRA run merges into the full weights
    merged = loaded.model.merge_and_unload()
    try:
        with staged_directory(output, readable=True) as staging:
            with safetensors_os_errors(output / "model.safetensors"):
                merged.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
            (staging / "README.md").write_text(run_card("merged", Path(adapter)), encoding="utf-8")
            pickled = [p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
            if pickled:  # align writes no pickle; a library that did would be a bug to catch here
                raise AlignError(f"{output}: refusing to write pickled weights ({', '.join(pickled)})")
            check_empty_output(output)  # nothing appeared there while the model was merging
    except BaseException as exc:
        from align.core.runner import WRITE_ERRNOS

        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # disk full: one line, nothing kept
            raise AlignError(
                f"{output}: could not write {exc.filename or 'the merged model'}: {exc.strerror}; "
                "nothing was kept: fix that and merge again"
            ) from exc
        raise
    return output
