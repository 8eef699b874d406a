"""From config to plan: every component named, built and checked before any model loads.

Data flows one way: config → plan (validated, fully resolved, printable) → engine → events.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core import config as configuration
from align.core.config import apply_overrides, blame_override, demo_dir, read_config, with_defaults
from align.core.params import build_component, factory_defaults
from align.core.settings import RunSettings
from align.core.sources import TopicSources
from align.core.topics import Topic, load_topics
from align.errors import ConfigError, PluginError, brief, closest
from align.plugins.manager import Registry

_STEP_KEYS = ("name", "train", "evaluate", "gate", "if_ran", "rollback")
_ROLLBACK_KEYS = ("step", "max_drop")


@dataclass(frozen=True)
class Rollback:
    """A guard on an evaluation step: if a metric fell by more than its tolerance since before
    training step ``step``, the engine restores the adapter from before that step."""

    step: str
    max_drop: dict[str, float]

    def describe(self) -> str:
        falls = " or ".join(f"{name} falls by more than {tol:g}" for name, tol in self.max_drop.items())
        return f"roll back '{self.step}' if {falls}"


@dataclass
class Component:
    """A built component and the registry name it came from."""

    name: str
    kind: str
    instance: Any
    #: Every param the factory was called with, defaults included.
    params: dict[str, Any]
    #: The component's top-level config section with defaults: what ``config.yaml`` records.
    section: dict[str, Any] = field(default_factory=dict)
    #: Params given in the step itself (``{use: dpo, beta: 0.05}``).
    inline: dict[str, Any] = field(default_factory=dict)
    #: The plugin that registered it, named in errors (``align.objectives.dpo``, ``align_recall``).
    plugin: str = ""


@dataclass
class Step:
    """One protocol step: train with one objective, or evaluate with evaluators; maybe gated."""

    name: str
    #: ``"train"`` or ``"eval"`` (config key ``evaluate:``), as summary.json and metrics.jsonl record it.
    kind: str
    components: list[Component]
    gate: Component | None = None
    if_ran: str | None = None
    rollback: Rollback | None = None

    def describe(self) -> str:
        what = ", ".join(c.name for c in self.components)
        verb = "evaluate" if self.kind == "eval" else self.kind
        text = f"{self.name}: {verb} {what}"
        if self.gate is not None:
            rules = ", ".join(self.gate.instance.metrics_needed())
            text += f" if gate '{self.gate.name}' passes (reads {rules})"
        if self.if_ran:
            text += f" if step '{self.if_ran}' ran"
        if self.rollback:
            text += f"; {self.rollback.describe()}"
        return text


@dataclass
class Plan:
    """Everything a run needs, resolved: the config as it will be recorded, topics and steps."""

    config: dict[str, Any]
    source: str
    topics: list[Topic]
    steps: list[Step]
    metric_names: list[str] = field(default_factory=list)
    #: The config's base settings, typed (``config`` holds the same values as data).
    settings: RunSettings = field(default_factory=RunSettings)


def demo_topics_path() -> Path:
    return demo_dir() / "topics"


def make_plan(
    registry: Registry,
    config_path: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    topics: str | Path | None = None,
    model: str | None = None,
    output: str | None = None,
) -> Plan:
    """Read, resolve and check a config (``None``: the built-in demo) into a :class:`Plan`."""
    data, source, base_dir = read_config(config_path)
    applied: list[tuple[str, str]] = []
    data = apply_overrides(data, overrides, applied=applied)
    if model is not None:
        if not model.strip():  # Path("") is the working directory, which was then taken as the model
            raise ConfigError(
                f"--model {model!r}: empty; give a Hugging Face model directory, a .gguf file, a hub id, "
                "or leave --model out for the config's model"
            )
        # A path given on the command line is relative to the working directory.
        section = data.get("model") if isinstance(data.get("model"), dict) else {}
        data["model"] = {**section, "path": str(Path(model).resolve()) if Path(model).exists() else model}
    if output is not None:
        data["output"] = output
    try:
        return resolve_plan(data, source, registry, base_dir=base_dir, topics=topics)
    except ConfigError as exc:
        blamed = blame_override(exc, source, applied)
        if blamed is exc:
            raise
        raise blamed from exc


def resolve_plan(
    data: Mapping[str, Any],
    source: str,
    registry: Registry,
    *,
    base_dir: Path = Path("."),
    topics: str | Path | Sequence[Topic] | None = None,
) -> Plan:
    """Check a config mapping against the registry and build every component it names.

    ``topics`` overrides the config's: a file or directory, or :class:`Topic` objects (tests).
    """
    component_names = {name for kind in ("objective", "evaluator", "gate") for name in registry.names(kind)}
    config, settings = with_defaults(data, component_names, source)
    _check_launch(settings, source)
    steps = _build_steps(config, source, registry)
    metric_names = _check_gates(steps, source)
    config["protocol"] = [_step_as_data(step) for step in steps]
    for step in steps:
        for component in step.components:
            config[component.name] = component.section
    given: list[Topic] | None = None
    if topics is not None and not isinstance(topics, (str, Path)):
        given = list(topics)
        topics = None
    # Relative paths in a config file are relative to that file; from the command line, to the cwd.
    if given is not None:
        topic_path = Path("<in memory>")
    elif topics is not None:
        topic_path = Path(topics)
    elif config["topics"] is not None:
        topic_path = _relative_to(config["topics"], base_dir)
    else:
        topic_path = demo_topics_path()
    config["topics"] = str(topic_path)
    model_path = Path(config["model"]["path"]).expanduser()
    if not model_path.is_absolute() and (base_dir / model_path).exists():  # a directory or a .gguf file
        config["model"]["path"] = str(base_dir / model_path)
    settings = dataclasses.replace(
        settings,
        topics=config["topics"],
        model=dataclasses.replace(settings.model, path=config["model"]["path"]),
    )
    topic_list = given if given is not None else load_topics(topic_path, TopicSources.from_registry(registry))
    _check_topics(topic_list, steps)
    return Plan(
        config=config,
        source=source,
        topics=topic_list,
        steps=steps,
        metric_names=metric_names,
        settings=settings,
    )


def _check_launch(settings: RunSettings, source: str) -> None:
    """What the settings need of the launch and of the installed libraries: checked here, not with
    the settings' values, so that checking a config imports no distributed helper."""
    from align.core import distributed

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    model = settings.model
    if model.quantization != "none" and distributed.lockstep():
        fail(
            "model.quantization",
            f"{model.quantization} base weights with FSDP: align shards only unquantized weights; launch "
            f"with configs/accelerate/ddp.yaml (each GPU holds the {model.quantization} model), or set "
            "model.quantization: none and keep FSDP",
        )
    if model.quantization != "none" and not configuration.bitsandbytes_available():
        fail(
            "model.quantization",
            f"{model.quantization} base weights need bitsandbytes, which is not installed; "
            f"`{configuration.BITSANDBYTES_INSTALL}` (on a machine with a CUDA GPU), or set model.quantization: none",
        )
    if model.device_map is not None and distributed.is_distributed():
        fail(
            "model.device_map",
            f"spreads one copy of the model over this process's devices, which a launch of "
            f"{distributed.world_size()} processes cannot share; remove model.device_map, or run one process",
        )


def _relative_to(path: str, base_dir: Path) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else base_dir / resolved


def _component_ref(ref: Any, where: str, source: str) -> tuple[str, dict[str, Any]]:
    """``dpo`` or ``{use: dpo, beta: 0.05}`` → ``("dpo", {"beta": 0.05})``."""
    if isinstance(ref, str) and ref:
        return ref, {}
    if isinstance(ref, Mapping):
        params = dict(ref)
        name = params.pop("use", None)
        if isinstance(name, str) and name:
            return name, params
        raise ConfigError(
            f"{source}: {where}: a component mapping needs 'use: <name>', e.g. {{use: threshold, all: [...]}}"
        )
    raise ConfigError(
        f"{source}: {where}: expected a component name or a mapping with 'use:', got {brief(ref)}"
    )


def _build(
    kind: str, ref: Any, where: str, config: Mapping[str, Any], source: str, registry: Registry
) -> Component:
    name, inline = _component_ref(ref, where, source)
    registration = registry.get(kind, name)
    if registration is None:
        names = registry.names(kind)
        raise ConfigError(
            f"{source}: {where}: unknown {kind} '{name}'{closest(name, names)} "
            f"(registered: {', '.join(names) or 'none'}; `align plugins` lists them)"
        )
    section = config.get(name) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{source}: {name}: must be a mapping of {kind} params, got {type(section).__name__}"
        )
    try:
        instance, params = build_component(
            registration.factory, {**section, **inline}, where if inline else name, source
        )
    except (Exception, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a plugin's SystemExit would end align with exit 0 and no word
        raise PluginError(
            f"{source}: {where}: plugin '{registration.plugin}' raised {type(exc).__name__}: {exc} while "
            f"building {kind} '{name}'; fix the plugin, or disable it with ALIGN_DISABLE_PLUGINS={registration.plugin}"
        ) from exc
    defaults = factory_defaults(registration.factory)
    converted_section = {key: params.get(key, value) for key, value in section.items() if key not in inline}
    return Component(
        name=name,
        kind=kind,
        instance=instance,
        params=copy.deepcopy({**defaults, **params}),
        section=copy.deepcopy({**defaults, **section, **converted_section}),
        inline={key: params.get(key, value) for key, value in inline.items()},
        plugin=registration.plugin,
    )


def _build_steps(config: Mapping[str, Any], source: str, registry: Registry) -> list[Step]:
    steps: list[Step] = []
    for index, raw in enumerate(config["protocol"]):
        where = f"protocol[{index}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: {where}: a step is a mapping such as {{name: sft, train: sft}}")
        _check_keys(raw, _STEP_KEYS, where, source)
        if ("train" in raw) == ("evaluate" in raw):
            raise ConfigError(
                f"{source}: {where}: a step has exactly one of 'train: <objective>' or 'evaluate: [...]'"
            )
        if "train" in raw:
            kind = "train"
            components = [_build("objective", raw["train"], f"{where}.train", config, source, registry)]
        else:
            kind = "eval"
            refs = raw["evaluate"]
            refs = [refs] if isinstance(refs, (str, Mapping)) else refs
            if not isinstance(refs, list) or not refs:
                raise ConfigError(f"{source}: {where}.evaluate: expected a non-empty list of evaluators")
            components = [
                _build("evaluator", ref, f"{where}.evaluate[{i}]", config, source, registry)
                for i, ref in enumerate(refs)
            ]
        name = raw.get("name") or (components[0].name if kind == "train" else f"eval{index}")
        if not isinstance(name, str):
            raise ConfigError(f"{source}: {where}.name: expected a string, got {brief(name)}")
        if any(step.name == name for step in steps):
            raise ConfigError(
                f"{source}: {where}.name: step name '{name}' is used twice; step names must be unique"
            )
        gate = None
        if raw.get("gate") is not None:
            gate = _build("gate", raw["gate"], f"{where}.gate", config, source, registry)
        if_ran = raw.get("if_ran")
        if if_ran is not None:
            _earlier_training_step(if_ran, steps, f"{where}.if_ran", source)
        rollback = None
        if raw.get("rollback") is not None:
            if kind != "eval":
                raise ConfigError(
                    f"{source}: {where}.rollback: only an evaluation step can guard a training step; "
                    "move it to the step that evaluates after training"
                )
            rollback = _rollback(raw["rollback"], f"{where}.rollback", steps, components, source)
        steps.append(
            Step(name=name, kind=kind, components=components, gate=gate, if_ran=if_ran, rollback=rollback)
        )
    return steps


def _check_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str, source: str) -> None:
    for key in raw:
        if key not in valid:
            raise ConfigError(
                f"{source}: {where}: unknown key '{key}'{closest(str(key), valid)} (valid: {', '.join(valid)})"
            )


def _earlier_training_step(name: Any, earlier: list[Step], where: str, source: str) -> str:
    trained = [s.name for s in earlier if s.kind == "train"]
    if name not in trained:
        raise ConfigError(
            f"{source}: {where}: {brief(name)} is not an earlier training step{closest(str(name), trained)} "
            f"(earlier training steps: {', '.join(trained) or 'none'})"
        )
    return name


def _rollback(
    raw: Any, where: str, earlier: list[Step], components: list[Component], source: str
) -> Rollback:
    """``{step: dpo, max_drop: {quiz.accuracy: 0.05}}`` → :class:`Rollback`, checked."""
    example = "e.g. {step: dpo, max_drop: {quiz.accuracy: 0.05}}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping, {example}")
    _check_keys(raw, _ROLLBACK_KEYS, where, source)
    step = _earlier_training_step(raw.get("step"), earlier, f"{where}.step", source)
    drops = raw.get("max_drop")
    if not isinstance(drops, Mapping) or not drops:
        raise ConfigError(f"{source}: {where}.max_drop: expected a mapping of metric to tolerance, {example}")
    # What this step records: a component's declared metrics, or any "<name>." for one that declares none.
    recorded = {c.name: _declared_metrics(c) for c in components}
    described = [m for names in recorded.values() for m in (names or [])] or sorted(recorded)
    max_drop = {}
    for name, tolerance in drops.items():
        owner = str(name).split(".")[0]
        if owner not in recorded or (recorded[owner] is not None and name not in recorded[owner]):
            raise ConfigError(
                f"{source}: {where}.max_drop: metric '{name}' is not recorded by this step"
                f"{closest(str(name), described)} (it records: {', '.join(described)})"
            )
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise ConfigError(
                f"{source}: {where}.max_drop.{name}: expected a number >= 0, got {brief(tolerance)}"
            )
        max_drop[str(name)] = float(tolerance)
    return Rollback(step=step, max_drop=max_drop)


def _declared_metrics(component: Component) -> list[str] | None:
    declared = getattr(component.instance, "metrics", None)
    if declared is None or isinstance(declared, str):
        return None
    return [f"{component.name}.{key}" for key in declared]


def _check_gates(steps: list[Step], source: str) -> list[str]:
    """Every metric a gate reads must be recorded by an earlier step; returns all recorded names."""
    recorded: list[str] = []
    open_prefixes: list[str] = []  # components that do not declare their metrics
    for index, step in enumerate(steps):
        if step.gate is not None:
            for metric in step.gate.instance.metrics_needed():
                if metric in recorded or any(metric.startswith(p + ".") for p in open_prefixes):
                    continue
                raise ConfigError(
                    f"{source}: protocol[{index}].gate: metric '{metric}' is not recorded by any earlier step"
                    f"{closest(metric, recorded)} (recorded before '{step.name}': {', '.join(recorded) or 'none'})"
                )
        for component in step.components:
            names = _declared_metrics(component)
            if names is None:
                open_prefixes.append(component.name)
            else:
                recorded.extend(n for n in names if n not in recorded)
    return recorded


def _check_topics(topics: list[Topic], steps: list[Step]) -> None:
    for step in steps:
        for component in step.components:
            for field_name in getattr(component.instance, "requires", ()):
                for topic in topics:
                    if not getattr(topic, field_name, None):
                        raise ConfigError(
                            f"{topic.source}: {field_name}: empty, but step '{step.name}' uses "
                            f"'{component.name}', which needs it; add {field_name} to the topic or "
                            "remove the step from the protocol"
                        )


def _step_as_data(step: Step) -> dict[str, Any]:
    data: dict[str, Any] = {"name": step.name}
    refs = [{"use": c.name, **c.inline} if c.inline else c.name for c in step.components]
    if step.kind == "train":
        data["train"] = refs[0]
    else:
        data["evaluate"] = refs
    if step.gate is not None:
        data["gate"] = {"use": step.gate.name, **step.gate.params}
    if step.if_ran:
        data["if_ran"] = step.if_ran
    if step.rollback:
        data["rollback"] = {"step": step.rollback.step, "max_drop": dict(step.rollback.max_drop)}
    return data
