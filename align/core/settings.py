"""The run's base settings as typed, frozen dataclasses: the config's ``model:``, ``lora:`` and
``replay:`` sections and its top-level keys (``seed``, ``on_error``, ``recheck`` …).

They are built with :func:`align.core.params.build_component`, the code that builds components
from their sections, so an unknown key is refused, with its "did you mean", in one place. Each
field is checked in ``__post_init__`` with :func:`align.require`, as a component checks its params;
the fields convert numbers written as strings themselves (``lora.alpha: "2"`` is ``2.0``), so
their messages are the ones the error catalogue (docs/errors.md) lists.

Only values are checked here. What depends on the launch (FSDP, several processes) or on an
installed library the model needs (bitsandbytes) is checked by the plan (align/core/plan.py),
so checking a config imports neither the model code nor the distributed helpers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from align.core.params import MAX_INT, ParamError, build_component, number_from_string, require
from align.errors import brief, closest

DEFAULT_TARGET_MODULES = ["o_proj", "v_proj", "up_proj", "down_proj"]
#: The values of ``model.dtype``.
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: The values of ``model.quantization``: the base weights as loaded (``none``) or through bitsandbytes.
QUANTIZATIONS = ("none", "4bit", "8bit")
#: The values of ``on_error``.
ON_ERROR = ("stop", "skip")
#: The values of ``recheck``: after each topic, evaluate every ``earlier`` topic again, or ``none``.
RECHECK = ("earlier", "none")
#: The values of ``replay.schedule``: which earlier items a topic replays (align/core/replay.py).
REPLAY_SCHEDULES = ("random", "spaced", "balanced", "expanding", "weakest")
#: The values of ``voice_set``: which held-out voice pairs score a topic's voice.
VOICE_SETS = ("person", "topic")
#: The largest ``lora.rank`` taken: far above any model's use (align's adapter is rank 1), far below
#: the 10**30 that ``rank: 1e30`` was read as.
MAX_RANK = 4096

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


def check_report_to(value: Any) -> None:
    """``report_to``: ``none``, a tracker's name or a list of them, each installed."""
    names = [value] if isinstance(value, str) else value
    require(
        isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names),
        "report_to",
        f"expected none, a tracker's name or a list of them ({', '.join(REPORT_TO)}), got {brief(value)}",
    )
    if names == ["none"]:
        return
    require(
        "none" not in names,
        "report_to",
        f"none goes alone (got {', '.join(names)}); give none, or the trackers without it",
    )
    for name in names:
        require(
            name in REPORT_TO,
            "report_to",
            f"'{name}' is not a tracker{closest(name, [*REPORT_TO, 'none'])} (trackers: none, {', '.join(REPORT_TO)})",
        )
        modules, package = REPORT_TO[name]
        if any(importlib.util.find_spec(module) is None for module in modules):
            instead = "set report_to: none" if isinstance(value, str) else f"take {name} out of report_to"
            raise ParamError("report_to", f"{name} is not installed; `pip install {package}`, or {instead}")
    require(
        len(set(names)) == len(names),
        "report_to",
        f"names a tracker twice ({', '.join(names)}); give each once",
    )


def number(key: str, value: Any, integer: bool = False) -> int | float:
    """``value`` as a number (one rule with the components' params, params.py: a string that reads
    as a number is it), or :class:`ParamError` for ``key``."""
    if isinstance(value, str) and number_from_string(value) is not None:
        value = number_from_string(value)
    require(
        not isinstance(value, bool) and isinstance(value, (int, float)),
        key,
        f"expected {'an integer' if integer else 'a number'}, got {brief(value)}",
    )
    # .nan passed every comparison below, .inf broke int()
    require(math.isfinite(value), key, f"must be a finite number (got {value})")
    require(
        not (integer and isinstance(value, float) and not value.is_integer()),
        key,
        f"expected an integer, got {brief(value)}",
    )
    return int(value) if integer else float(value)


def _set(instance: Any, name: str, value: Any) -> None:
    object.__setattr__(instance, name, value)  # a frozen dataclass keeps its converted value


def _is_device_mapping(value: Any) -> bool:
    """A ``device_map`` mapping: module names to a GPU number or a device name (``cpu``, ``disk``)."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, (int, str)) and not isinstance(v, bool) for k, v in value.items()
    )


@dataclass(frozen=True)
class ModelSettings:
    """The config's ``model:`` section: the base model and how it is loaded."""

    path: str = "smollm2"
    dtype: str = "float32"
    trust_remote_code: bool = False
    eval_batch_size: int = 16
    #: Prompts as user turns of the tokenizer's chat template: ``auto`` (when it has one),
    #: ``true`` (required: a tokenizer without one is an error) or ``false`` (plain text).
    chat_template: str | bool = "auto"
    #: Recompute activations in the backward pass instead of keeping them (large models).
    gradient_checkpointing: bool = False
    #: The frozen base weights as loaded (``none``), or ``4bit`` / ``8bit`` through bitsandbytes.
    quantization: str = "none"
    #: ``auto`` or a mapping of module to device: one model spread over this process's devices.
    device_map: str | dict[str, int | str] | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.path, str) and bool(self.path),
            "path",
            "expected a model directory, a hub id, or 'smollm2'",
        )
        require(self.dtype in DTYPES, "dtype", f"'{self.dtype}' is not one of {', '.join(DTYPES)}")
        require(
            isinstance(self.trust_remote_code, bool),
            "trust_remote_code",
            f"expected true or false, got {brief(self.trust_remote_code)}",
        )
        require(
            self.chat_template in ("auto", True, False),
            "chat_template",
            f"expected auto, true or false, got {brief(self.chat_template)}",
        )
        require(
            isinstance(self.gradient_checkpointing, bool),
            "gradient_checkpointing",
            f"expected true or false, got {brief(self.gradient_checkpointing)}",
        )
        if self.quantization in (None, False):
            _set(self, "quantization", "none")
        require(
            self.quantization in QUANTIZATIONS,
            "quantization",
            f"expected one of {', '.join(QUANTIZATIONS)}, got {brief(self.quantization)}"
            f"{closest(str(self.quantization), QUANTIZATIONS)}",
        )
        require(
            self.device_map in (None, "auto") or _is_device_mapping(self.device_map),
            "device_map",
            f"expected auto, or a mapping of module name to device (e.g. {{model.layers.0: 0, lm_head: 1}}), "
            f"got {brief(self.device_map)}",
        )
        _set(self, "eval_batch_size", number("eval_batch_size", self.eval_batch_size, integer=True))
        require(
            1 <= self.eval_batch_size <= MAX_INT,
            "eval_batch_size",
            f"must be between 1 and {MAX_INT} (got {self.eval_batch_size:.3g})",
        )


@dataclass(frozen=True)
class LoraSettings:
    """The config's ``lora:`` section: the run's one adapter."""

    rank: int = 1
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(DEFAULT_TARGET_MODULES)

    def __post_init__(self) -> None:
        _set(self, "rank", number("rank", self.rank, integer=True))
        require(self.rank >= 1, "rank", f"must be >= 1 (got {self.rank})")
        # 1e30 read as 10**30 and passed, to fail once the model loaded
        require(self.rank <= MAX_RANK, "rank", f"must be at most {MAX_RANK} (got {self.rank:.3g})")
        _set(self, "alpha", number("alpha", self.alpha))
        require(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        _set(self, "dropout", number("dropout", self.dropout))
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")
        targets = self.target_modules
        require(
            isinstance(targets, (list, tuple))
            and bool(targets)
            and all(isinstance(t, str) and t for t in targets),
            "target_modules",
            "expected a non-empty list of module names, e.g. [o_proj, v_proj]",
        )
        _set(self, "target_modules", tuple(targets))


@dataclass(frozen=True)
class ReplaySettings:
    """The config's ``replay:`` section: earlier topics' training items mixed into each later topic's
    training steps, as a multiple of the topic's own count (align/core/replay.py): passages for SFT,
    preference pairs for DPO."""

    content: float = 1.0
    preference_pairs: float = 0.0
    #: ``random``: a fresh seeded sample of every earlier item for each topic; ``spaced``: the
    #: items trained longest ago first (ties drawn with the seed), so every earlier item comes
    #: back before any comes back twice; ``balanced``: an even share for each earlier topic, its
    #: items trained longest ago first; ``expanding``: half to the topic just before, the rest
    #: trained longest ago; ``weakest``: the items the adapter answers worst on a self-test made
    #: from them, scored as each step starts. ``spaced`` kept more of each earlier answer's lead
    #: than ``random`` at four seeds of four (docs/quality.md); on the demo both pick the same items.
    schedule: str = "spaced"

    def __post_init__(self) -> None:
        require(
            self.schedule in REPLAY_SCHEDULES,
            "schedule",
            f"expected one of {', '.join(REPLAY_SCHEDULES)}, got {brief(self.schedule)}"
            f"{closest(str(self.schedule), REPLAY_SCHEDULES)}",
        )
        for f in dataclasses.fields(self):
            if f.name == "schedule":
                continue
            value = number(f.name, getattr(self, f.name))
            require(
                0 <= value <= 100,
                f.name,
                f"must be between 0 (no replay) and 100 earlier items per item of the topic (got {value:g})",
            )
            _set(self, f.name, value)

    def as_dict(self) -> dict[str, float]:
        """Each kind of item and its multiple (what :func:`align.core.replay.replay_topic` takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "schedule"}


@dataclass(frozen=True)
class RunSettings:
    """The config's base settings: its top-level keys and its ``replay:``, ``model:`` and ``lora:``
    sections (the protocol and the components' sections are the plan's steps)."""

    name: str | None = None
    output: str | None = None
    seed: int = 0
    topics: str | None = None
    #: Refuse to run when an installed plugin fails to load (``--strict-plugins`` does the same).
    strict_plugins: bool = False
    #: What a failed step does to the run: ``stop`` it (results so far kept, ``--resume`` retries
    #: the step) or ``skip`` it (recorded as failed, the run goes on).
    on_error: str = "stop"
    #: Seconds an evaluator's call may take before it fails its step and stops the run (``None``:
    #: no limit); see ``Engine._evaluate`` for why a timed-out evaluator stops even ``on_error: skip``.
    evaluate_timeout: float | None = None
    #: After each topic, evaluate every earlier topic again with the current adapter (forgetting).
    recheck: str = "earlier"
    #: Where the trainers log besides metrics.jsonl: ``none``, a tracker's name or a list of them.
    report_to: str | list[str] = "none"
    #: The held-out voice pairs that score each topic's voice: every topic's (``person``: a voice
    #: belongs to the person, and more pairs give a score that can show something) or its own.
    voice_set: str = "person"
    #: The CPU threads torch computes with: ``auto`` (torch's own choice, one per core) or a number.
    #: Two runs on one machine each take every core unless told otherwise (align/core/machine.py).
    threads: int | str = "auto"
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        seed = number("seed", self.seed, integer=True)
        _set(self, "seed", seed)
        # what numpy's seeding takes: -1 failed after the model loaded
        require(0 <= seed < 2**32, "seed", f"must be between 0 and {2**32 - 1} (got {seed:g})")
        for key in ("name", "output", "topics"):
            value = getattr(self, key)
            require(value is None or isinstance(value, str), key, f"expected a string, got {brief(value)}")
        require(
            isinstance(self.strict_plugins, bool),
            "strict_plugins",
            f"expected true or false, got {brief(self.strict_plugins)}",
        )
        if self.evaluate_timeout is not None:
            timeout = number("evaluate_timeout", self.evaluate_timeout)
            _set(self, "evaluate_timeout", timeout)
            require(
                timeout > 0,
                "evaluate_timeout",
                f"must be a number of seconds > 0, or null for none (got {timeout:g})",
            )
        require(
            self.on_error in ON_ERROR,
            "on_error",
            f"expected one of {', '.join(ON_ERROR)}, got {brief(self.on_error)}",
        )
        for key, valid in (("recheck", RECHECK), ("voice_set", VOICE_SETS)):
            value = getattr(self, key)
            require(
                value in valid,
                key,
                f"expected one of {', '.join(valid)}, got {brief(value)}{closest(str(value), valid)}",
            )
        if self.threads != "auto":
            try:  # the one rule for numbers (a string that reads as one is it), worded for threads
                threads = number("threads", self.threads, integer=True)
            except ParamError:
                threads = 0
            require(
                1 <= threads <= 1024,
                "threads",
                f"expected auto or a number of threads from 1 to 1024, got {brief(self.threads)}",
            )
            _set(self, "threads", threads)
        check_report_to(self.report_to)
        require(
            self.name is None or ("/" not in self.name and self.name not in ("", ".", "..")),
            "name",
            f"'{self.name}' must be a plain directory name (no '/')",
        )

    @property
    def trackers(self) -> list[str]:
        """``report_to`` as a list of tracker names (``none``: no tracker)."""
        return report_targets(self.report_to)

    def as_config(self) -> dict[str, Any]:
        """The settings as config data, in the config's order (what ``config.yaml`` records)."""
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data


#: The sections of :class:`RunSettings`, each a mapping of its own settings.
SECTIONS: dict[str, type] = {"replay": ReplaySettings, "model": ModelSettings, "lora": LoraSettings}


def build_settings(config: Mapping[str, Any], source: str) -> RunSettings:
    """The :class:`RunSettings` of a config's base keys (missing ones take their defaults); errors
    name ``source`` and the key (``<source>: lora.rank: must be >= 1 (got 0)``)."""
    top = {
        f.name: config[f.name]
        for f in dataclasses.fields(RunSettings)
        if f.name not in SECTIONS and f.name in config
    }
    settings, _ = build_component(RunSettings, top, "", source, checks_values=True)
    sections = {}
    for name, factory in SECTIONS.items():
        sections[name], _ = build_component(factory, config.get(name) or {}, name, source, checks_values=True)
    return dataclasses.replace(settings, **sections)
