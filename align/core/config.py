"""The run config: defaults, loading a YAML file, ``--set`` overrides, and checking base sections.

A config is data (``yaml.safe_load``). Top-level keys are the base sections below, plus one
section per component, named like the component (``dpo:``, ``sft:``, ``quiz:`` …), holding that
component's params. The seed's ``configs/dpo.yaml`` (sections ``dpo:`` and ``lora:``) is a
complete config: everything it leaves out has a default.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from align.core.params import check_keys
from align.core.settings import (  # noqa: F401  (re-exported)
    DEFAULT_TARGET_MODULES,
    REPORT_TO,
    SECTIONS,
    RunSettings,
    build_settings,
    report_targets,
)
from align.core.topics import MAX_DEPTH, check_shape, read_data_file
from align.errors import ConfigError, closest

BITSANDBYTES_INSTALL = "pip install bitsandbytes"


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes (``model.quantization``: 4bit, 8bit) is installed; imports nothing."""
    return importlib.util.find_spec("bitsandbytes") is not None


#: The seed's protocol: evaluate, SFT, evaluate, DPO when the gate passes, evaluate again.
DEFAULT_PROTOCOL: list[dict[str, Any]] = [
    {"name": "before", "evaluate": ["quiz", "voice", "style"]},
    {"name": "sft", "train": "sft"},
    {"name": "after_sft", "evaluate": ["quiz", "voice"]},
    {
        "name": "dpo",
        "train": "dpo",
        "gate": {"use": "threshold", "all": ["quiz.accuracy >= 0.70", "voice.score < 0.75"]},
    },
    {"name": "after_dpo", "evaluate": ["quiz", "voice", "style"], "if_ran": "dpo"},
]

#: The config's top-level keys and their defaults, in the order ``config.yaml`` records them: the
#: run's settings (align/core/settings.py) and the protocol.
BASE_DEFAULTS: dict[str, Any] = {**RunSettings().as_config(), "protocol": DEFAULT_PROTOCOL}


def demo_dir() -> Path:
    """The built-in demo: ``demo.yaml`` and ``topics/``, ordinary files inside the package."""
    return Path(str(resources.files("align") / "demo"))


def demo_config_path() -> Path:
    return demo_dir() / "demo.yaml"


def read_config(path: str | Path | None) -> tuple[dict[str, Any], str, Path]:
    """Read a config file into ``(data, source name, directory relative paths start from)``."""
    if path is None:
        path = demo_config_path()
    path = Path(path)
    data = read_data_file(path, "config file", ConfigError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of sections (model:, lora:, dpo:, …), got {type(data).__name__}"
        )
    return data, str(path), path.parent


def apply_overrides(
    data: dict[str, Any],
    overrides: Iterable[str],
    source: str = "--set",
    applied: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; each value is read as YAML (``0.05`` is a number, ``[a, b]`` a list).

    A list item is named by its index or, for a protocol step, by its name
    (``protocol.after_dpo.rollback.max_drop.quiz.accuracy=0.2``); what follows ``max_drop`` is one
    metric name, dots and all. Into a config without a ``protocol``, the default protocol is what is
    set. ``applied`` receives ``(override, key)`` for each, the key written as error messages write
    it (``protocol[4].rollback.max_drop.quiz.accuracy``), so a bad value can name its ``--set``.
    """
    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {override!r}: expected KEY=VALUE, e.g. --set dpo.beta=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise ConfigError(
                f"{source} {key.strip()!r}: nested more than {MAX_DEPTH} levels deep; check the value"
            ) from None
        check_shape(value, f"{source} {key.strip()!r}", "config value", ConfigError)
        parts = key.strip().split(".")
        if "max_drop" in parts[:-2]:  # a metric's name has dots: quiz.accuracy
            at = parts.index("max_drop") + 1
            parts = [*parts[:at], ".".join(parts[at:])]
        if parts[0] == "protocol" and len(parts) > 1 and data.get("protocol") is None:
            data["protocol"] = copy.deepcopy(DEFAULT_PROTOCOL)
        node: Any = data
        written = ""
        created = None  # the first section this override made: everything in it came from the --set
        for depth, part in enumerate(parts):
            if isinstance(node, list):
                index = _index(part, node, override, source)
                written += f"[{index}]"
                if depth == len(parts) - 1:
                    node[index] = value
                else:
                    node = node[index]
                continue
            written += f".{part}" if written else part
            if not isinstance(node, dict):
                where = written.rpartition(".")[0] if "." in written else written
                if depth == len(parts) - 1:
                    raise ConfigError(
                        f"{source} {override!r}: cannot set a key inside a {type(node).__name__}"
                    )
                raise ConfigError(f"{source} {override!r}: '{where}' is not a section")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                    created = created or written
                node = node[part]
        if applied is not None:
            applied.append((override, created or written))
    return data


def _index(part: str, node: list[Any], override: str, source: str) -> int:
    """The index of a list item: its number, or the name of the step (a mapping with ``name:``,
    or a training step's objective when it has no name)."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    names = [_item_name(item) for item in node]
    if part in names:
        return names.index(part)
    known = [name for name in names if isinstance(name, str)]
    span = f"0..{len(node) - 1}" if node else "the list is empty"
    if known:
        raise ConfigError(
            f"{source} {override!r}: '{part}' is neither an index ({span}) nor a step's name "
            f"({', '.join(known)}){closest(part, known)}"
        )
    raise ConfigError(f"{source} {override!r}: '{part}' is not an index of a list of {len(node)} items")


def _item_name(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    name = item.get("name") or item.get("train")
    return name if isinstance(name, str) else None


def blame_override(error: ConfigError, source: str, applied: Iterable[tuple[str, str]]) -> ConfigError:
    """``error`` about the config file ``source`` as an error of the ``--set`` that gave the key it
    names (``<source>: dpo.beta: ...`` from ``--set dpo.beta=-1``); ``error`` itself otherwise."""
    message = str(error)
    prefix = f"{source}: "
    if not message.startswith(prefix):
        return error
    rest = message[len(prefix) :]
    named = rest.split(": ", 1)[0] if not rest.startswith("unknown key '") else rest.split("'")[1]
    for override, key in reversed(list(applied)):
        if _within(named, key) or _within(key, named):
            return ConfigError(f"--set {override!r}: {rest}")
    return error


def _within(key: str, section: str) -> bool:
    """Whether ``key`` is ``section`` or inside it (``protocol[4].gate`` is inside ``protocol``)."""
    return key == section or key.startswith((f"{section}.", f"{section}["))


def with_defaults(
    data: Mapping[str, Any], component_names: Iterable[str], source: str
) -> tuple[dict[str, Any], RunSettings]:
    """Check top-level and base-section keys, and fill in the base defaults: the config as it will
    be recorded (numbers written as strings converted) and its :class:`RunSettings`."""
    component_names = set(component_names)
    valid_top = list(BASE_DEFAULTS) + sorted(component_names)
    for key in data:
        if key not in BASE_DEFAULTS and key not in component_names:
            raise ConfigError(
                f"{source}: unknown key '{key}'{closest(str(key), valid_top)} "
                f"(top-level keys are {', '.join(BASE_DEFAULTS)}, or a component's name: "
                f"{', '.join(sorted(component_names))})"
            )
    resolved = copy.deepcopy(BASE_DEFAULTS)
    for key, value in data.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {key}: must be a mapping of settings, got {type(value).__name__}"
                )
            check_keys(SECTIONS[key], value, key, source)
            resolved[key] = {**resolved[key], **value}
        else:
            resolved[key] = copy.deepcopy(value)
    settings = build_settings(resolved, source)
    if not isinstance(resolved["protocol"], list) or not resolved["protocol"]:
        raise ConfigError(f"{source}: protocol: expected a non-empty list of steps")
    resolved.update(settings.as_config())
    return resolved, settings


def dump_config(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML, in the order a person reads it."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
