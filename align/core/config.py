"""The run config: defaults, loading a YAML file, ``--set`` overrides, and checking base sections.

A config is data (``yaml.safe_load``). Top-level keys are the base sections below, plus one
section per component, named like the component (``dpo:``, ``sft:``, ``quiz:`` …), holding that
component's params. The seed's ``configs/dpo.yaml`` (sections ``dpo:`` and ``lora:``) is a
complete config: everything it leaves out has a default.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from align.core.params import MAX_INT, number_from_string
from align.core.topics import MAX_DEPTH, check_shape, read_data_file
from align.errors import ConfigError, brief, closest

DEFAULT_TARGET_MODULES = ["o_proj", "v_proj", "up_proj", "down_proj"]
#: The values of ``model.dtype``.
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: The values of ``model.quantization``: the base weights as loaded (``none``) or through bitsandbytes.
QUANTIZATIONS = ("none", "4bit", "8bit")
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

#: The values of ``on_error``.
ON_ERROR = ("stop", "skip")
#: The values of ``recheck``: after each topic, evaluate every ``earlier`` topic again, or ``none``.
RECHECK = ("earlier", "none")
#: The trackers ``report_to`` names: transformers' integrations, each with the modules it needs
#: and what to install. ``tensorboard`` writes into the run (``tensorboard/<topic>-<step>``); the
#: others are handed to every trainer as they are (transformers' ``report_to``) and log where
#: their own settings say (``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...). transformers' ``kubeflow``
#: is left out: it turns itself on from its environment, whatever ``report_to`` says.
REPORT_TO: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "neptune": (("neptune",), "neptune"),
    "clearml": (("clearml",), "clearml"),
    "dagshub": (("dagshub", "mlflow"), "dagshub mlflow"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "azure_ml": (("azureml",), "azureml-core"),
    "flyte": (("flytekit",), "flytekit"),
}


def report_targets(value: Any) -> list[str]:
    """``report_to`` as a list of tracker names (``none``: no tracker)."""
    if value in (None, "none"):
        return []
    return [value] if isinstance(value, str) else list(value)


#: The values of ``voice_set``: which held-out voice pairs score a topic's voice.
VOICE_SETS = ("person", "topic")

BASE_DEFAULTS: dict[str, Any] = {
    "name": None,
    "output": None,
    "seed": 0,
    "topics": None,
    #: Refuse to run when an installed plugin fails to load (``--strict-plugins`` does the same).
    "strict_plugins": False,
    #: What a failed step does to the run: ``stop`` it (results so far kept, ``--resume`` retries
    #: the step) or ``skip`` it (recorded as failed, the run goes on).
    "on_error": "stop",
    #: Seconds an evaluator's call may take before it fails its step and stops the run (``None``:
    #: no limit); see ``Engine._evaluate`` for why a timed-out evaluator stops even ``on_error: skip``.
    "evaluate_timeout": None,
    #: After each topic, evaluate every earlier topic again with the current adapter (forgetting).
    "recheck": "earlier",
    #: Where the trainers log besides metrics.jsonl: ``none`` or ``tensorboard``.
    "report_to": "none",
    #: The held-out voice pairs that score each topic's voice: every topic's (``person``: a voice
    #: belongs to the person, and more pairs give a score that can show something) or its own.
    "voice_set": "person",
    #: Earlier topics' training items mixed into each later topic's training steps, as a multiple
    #: of the topic's own count (align/core/replay.py): passages for SFT, preference pairs for DPO.
    "replay": {"content": 1.0, "preference_pairs": 0.0},
    "model": {
        "path": "smollm2",
        "dtype": "float32",
        "trust_remote_code": False,
        "eval_batch_size": 16,
        #: Prompts as user turns of the tokenizer's chat template: ``auto`` (when it has one),
        #: ``true`` (required: a tokenizer without one is an error) or ``false`` (plain text).
        "chat_template": "auto",
        #: Recompute activations in the backward pass instead of keeping them (large models).
        "gradient_checkpointing": False,
        #: The frozen base weights as loaded (``none``), or ``4bit`` / ``8bit`` through bitsandbytes.
        "quantization": "none",
        #: ``auto`` or a mapping of module to device: one model spread over this process's devices.
        "device_map": None,
    },
    "lora": {
        "rank": 1,
        "alpha": 1.0,
        "dropout": 0.0,
        "target_modules": DEFAULT_TARGET_MODULES,
    },
    "protocol": DEFAULT_PROTOCOL,
}
SECTION_KEYS = {
    "model": BASE_DEFAULTS["model"],
    "lora": BASE_DEFAULTS["lora"],
    "replay": BASE_DEFAULTS["replay"],
}


def check_report_to(value: Any, fail: Callable[[str, str], Any]) -> None:
    """``report_to``: ``none``, a tracker's name or a list of them, each installed."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        fail(
            "report_to",
            f"expected none, a tracker's name or a list of them ({', '.join(REPORT_TO)}), got {brief(value)}",
        )
    if names == ["none"]:
        return
    if "none" in names:
        fail("report_to", f"none goes alone (got {', '.join(names)}); give none, or the trackers without it")
    for name in names:
        if name not in REPORT_TO:
            fail(
                "report_to",
                f"'{name}' is not a tracker{closest(name, [*REPORT_TO, 'none'])} (trackers: none, {', '.join(REPORT_TO)})",
            )
        modules, package = REPORT_TO[name]
        if any(importlib.util.find_spec(module) is None for module in modules):
            instead = "set report_to: none" if isinstance(value, str) else f"take {name} out of report_to"
            fail("report_to", f"{name} is not installed; `pip install {package}`, or {instead}")
    if len(set(names)) < len(names):
        fail("report_to", f"names a tracker twice ({', '.join(names)}); give each once")


#: The largest ``lora.rank`` taken: far above any model's use (align's adapter is rank 1), far below
#: the 10**30 that ``rank: 1e30`` was read as.
MAX_RANK = 4096


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


def with_defaults(data: Mapping[str, Any], component_names: Iterable[str], source: str) -> dict[str, Any]:
    """Check top-level and base-section keys, and fill in the base defaults."""
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
        if key in SECTION_KEYS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {key}: must be a mapping of settings, got {type(value).__name__}"
                )
            for sub, sub_value in value.items():
                if sub not in SECTION_KEYS[key]:
                    raise ConfigError(
                        f"{source}: unknown key '{key}.{sub}'{closest(str(sub), SECTION_KEYS[key])} "
                        f"(valid: {', '.join(SECTION_KEYS[key])})"
                    )
                resolved[key][sub] = sub_value
        else:
            resolved[key] = copy.deepcopy(value)
    _check_base(resolved, source)
    return resolved


def _check_base(config: dict[str, Any], source: str) -> None:
    from align.core import distributed

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key}: {message}")

    def number(key: str, value: Any, integer: bool = False) -> float:
        # One rule with the components' params (params.py): a string that reads as a number is it.
        if isinstance(value, str) and number_from_string(value) is not None:
            value = number_from_string(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"expected {'an integer' if integer else 'a number'}, got {brief(value)}")
        if not math.isfinite(value):  # .nan passed every comparison below, .inf broke int()
            fail(key, f"must be a finite number (got {value})")
        if integer and isinstance(value, float) and not value.is_integer():
            fail(key, f"expected an integer, got {brief(value)}")
        return int(value) if integer else float(value)

    config["seed"] = number("seed", config["seed"], integer=True)
    if not 0 <= config["seed"] < 2**32:  # what numpy's seeding takes: -1 failed after the model loaded
        fail("seed", f"must be between 0 and {2**32 - 1} (got {config['seed']:g})")
    for key in ("name", "output", "topics"):
        if config[key] is not None and not isinstance(config[key], str):
            fail(key, f"expected a string, got {brief(config[key])}")
    if not isinstance(config["strict_plugins"], bool):
        fail("strict_plugins", f"expected true or false, got {brief(config['strict_plugins'])}")
    if config["evaluate_timeout"] is not None:
        config["evaluate_timeout"] = number("evaluate_timeout", config["evaluate_timeout"])
        if config["evaluate_timeout"] <= 0:
            fail(
                "evaluate_timeout",
                f"must be a number of seconds > 0, or null for none (got {config['evaluate_timeout']:g})",
            )
    if config["on_error"] not in ON_ERROR:
        fail("on_error", f"expected one of {', '.join(ON_ERROR)}, got {brief(config['on_error'])}")
    for key, valid in (("recheck", RECHECK), ("voice_set", VOICE_SETS)):
        if config[key] not in valid:
            fail(
                key,
                f"expected one of {', '.join(valid)}, got {brief(config[key])}{closest(str(config[key]), valid)}",
            )
    check_report_to(config["report_to"], fail)
    if config["name"] is not None and ("/" in config["name"] or config["name"] in ("", ".", "..")):
        fail("name", f"'{config['name']}' must be a plain directory name (no '/')")
    model = config["model"]
    if not isinstance(model["path"], str) or not model["path"]:
        fail("model.path", "expected a model directory, a hub id, or 'smollm2'")
    if model["dtype"] not in DTYPES:
        fail("model.dtype", f"'{model['dtype']}' is not one of {', '.join(DTYPES)}")
    if not isinstance(model["trust_remote_code"], bool):
        fail("model.trust_remote_code", f"expected true or false, got {brief(model['trust_remote_code'])}")
    if model["chat_template"] not in ("auto", True, False):
        fail("model.chat_template", f"expected auto, true or false, got {brief(model['chat_template'])}")
    if not isinstance(model["gradient_checkpointing"], bool):
        fail(
            "model.gradient_checkpointing",
            f"expected true or false, got {brief(model['gradient_checkpointing'])}",
        )
    if model["quantization"] in (None, False):
        model["quantization"] = "none"
    if model["quantization"] not in QUANTIZATIONS:
        fail(
            "model.quantization",
            f"expected one of {', '.join(QUANTIZATIONS)}, got {brief(model['quantization'])}"
            f"{closest(str(model['quantization']), QUANTIZATIONS)}",
        )
    if model["quantization"] != "none" and distributed.lockstep():
        fail(
            "model.quantization",
            f"{model['quantization']} base weights with FSDP: align shards only unquantized weights; launch "
            f"with configs/accelerate/ddp.yaml (each GPU holds the {model['quantization']} model), or set "
            "model.quantization: none and keep FSDP",
        )
    if model["quantization"] != "none" and not bitsandbytes_available():
        fail(
            "model.quantization",
            f"{model['quantization']} base weights need bitsandbytes, which is not installed; "
            f"`{BITSANDBYTES_INSTALL}` (on a machine with a CUDA GPU), or set model.quantization: none",
        )
    device_map = model["device_map"]
    if device_map not in (None, "auto") and not _is_device_mapping(device_map):
        fail(
            "model.device_map",
            f"expected auto, or a mapping of module name to device (e.g. {{model.layers.0: 0, lm_head: 1}}), "
            f"got {brief(device_map)}",
        )
    if device_map is not None and distributed.is_distributed():
        fail(
            "model.device_map",
            f"spreads one copy of the model over this process's devices, which a launch of "
            f"{distributed.world_size()} processes cannot share; remove model.device_map, or run one process",
        )
    model["eval_batch_size"] = number("model.eval_batch_size", model["eval_batch_size"], integer=True)
    if not 1 <= model["eval_batch_size"] <= MAX_INT:
        fail("model.eval_batch_size", f"must be between 1 and {MAX_INT} (got {model['eval_batch_size']:.3g})")
    lora = config["lora"]
    lora["rank"] = number("lora.rank", lora["rank"], integer=True)
    if lora["rank"] < 1:
        fail("lora.rank", f"must be >= 1 (got {lora['rank']})")
    if lora["rank"] > MAX_RANK:  # 1e30 read as 10**30 and passed, to fail once the model loaded
        fail("lora.rank", f"must be at most {MAX_RANK} (got {lora['rank']:.3g})")
    lora["alpha"] = number("lora.alpha", lora["alpha"])
    if lora["alpha"] <= 0:
        fail("lora.alpha", f"must be > 0 (got {lora['alpha']})")
    lora["dropout"] = number("lora.dropout", lora["dropout"])
    if not 0 <= lora["dropout"] < 1:
        fail("lora.dropout", f"must be in [0, 1) (got {lora['dropout']})")
    targets = lora["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        fail("lora.target_modules", "expected a non-empty list of module names, e.g. [o_proj, v_proj]")
    for key in config["replay"]:
        value = number(f"replay.{key}", config["replay"][key])
        if not 0 <= value <= 100:
            fail(
                f"replay.{key}",
                f"must be between 0 (no replay) and 100 earlier items per item of the topic (got {value:g})",
            )
        config["replay"][key] = value
    if not isinstance(config["protocol"], list) or not config["protocol"]:
        fail("protocol", "expected a non-empty list of steps")


def _is_device_mapping(value: Any) -> bool:
    """A ``device_map`` mapping: module names to a GPU number or a device name (``cpu``, ``disk``)."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, (int, str)) and not isinstance(v, bool) for k, v in value.items()
    )


def dump_config(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML, in the order a person reads it."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
