"""Checkpoints: where a run stands after its last finished step, so ``align run --resume`` can go on.

After every step the engine writes ``checkpoint/``: the adapter's weights, the adapters that a
rollback guard may still restore, and ``state.json`` with the results so far and how many bytes of
``metrics.jsonl`` they account for. The weights are written first, each to a new file name, and
``state.json`` last, by a rename; so whatever moment a run is killed at, ``state.json`` names
complete files, and files it no longer names are removed only after it is in place.

The policy decides how its weights are stored (``save_snapshot`` / ``load_snapshot``): the real
model writes safetensors, the stub policy of :mod:`align.testing` writes JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.core import distributed
from align.core.rundir import atomic_write_text
from align.core.topics import Topic
from align.errors import AlignError, ConfigError

logger = logging.getLogger(__name__)

#: Bumped when ``state.json`` changes in a way an older align could not read.
FORMAT = 1
STATE_FILE = "state.json"
DAMAGED = "the checkpoint is damaged, so the run cannot be resumed: start a new run"


def topics_digest(topics: Sequence[Topic]) -> str:
    """A fingerprint of the topics' content: a resumed run must train on what the run started with."""
    text = json.dumps([topic.to_dict() for topic in topics], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: The settings a checkpoint depends on: the base model and the adapter's shape (a rank-1 adapter
#: read into rank 2 is broadcast, not trained), and the protocol's steps (the position it records).
#: A resume with any of them changed is refused; the learning rates and other params may change.
CHECKPOINT_SETTINGS = (
    "model.path",
    "model.quantization",
    "lora.rank",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "protocol",
)


def checkpoint_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The values of :data:`CHECKPOINT_SETTINGS` in a resolved config, as ``state.json`` holds them
    (``protocol``: the step names)."""
    settings: dict[str, Any] = {}
    for key in CHECKPOINT_SETTINGS:
        section, _, name = key.partition(".")
        value = config.get(section)
        if name:
            value = value.get(name) if isinstance(value, Mapping) else None
        elif key == "protocol":
            value = [step.get("name") for step in value or ()]
        settings[key] = json.loads(json.dumps(value))  # as read back from state.json
    return settings


def check_settings(state: Mapping[str, Any], config: Mapping[str, Any], source: str | Path) -> None:
    """Refuse to resume from ``state`` with a config whose :data:`CHECKPOINT_SETTINGS` differ from
    those the checkpoint was made with (a checkpoint of an older align records none)."""
    recorded = state.get("settings")
    if not isinstance(recorded, Mapping):
        return
    for key, value in checkpoint_settings(config).items():
        if key in recorded and recorded[key] != value:
            was = _show(recorded[key])
            raise ConfigError(
                f"{source}: {key}: is {_show(value)}, but the run's checkpoint was made with {was}, "
                f"which its adapter and position depend on; set it back to {was} to resume, or start a new run"
            )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the engine's state, the adapter, and the rollback snapshots."""

    state: dict[str, Any]
    adapter: Any
    #: Guarded training step name → (adapter before it, metrics before it).
    snapshots: dict[str, tuple[Any, dict[str, float]]]


class Checkpoints:
    """The ``checkpoint/`` directory of a run, written through ``policy``."""

    def __init__(self, directory: str | Path, policy: Any):
        self.directory = Path(directory)
        self.policy = policy
        self.sequence = 0

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def save(
        self,
        state: Mapping[str, Any],
        adapter: Any,
        snapshots: Mapping[str, tuple[Any, Mapping[str, float]]],
    ) -> None:
        """Write the adapter, the snapshots, then ``state.json``; then drop files it no longer names.

        Under a multi-process launch only the main process writes (every process holds the same
        adapter); the others count along, so each knows the sequence number a resume reads back.
        """
        started = time.perf_counter()
        self.sequence += 1
        if not distributed.is_main():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tag = f"{self.sequence:06d}"
        adapter_file = self.policy.save_snapshot(adapter, self.directory / f"adapter-{tag}").name
        snapshot_entries = {}
        for index, (step, (weights, before)) in enumerate(snapshots.items()):
            path = self.policy.save_snapshot(weights, self.directory / f"before-{index}-{tag}")
            snapshot_entries[step] = {"file": path.name, "metrics": dict(before)}
        record = {
            **state,
            "format": FORMAT,
            "sequence": self.sequence,
            "adapter": adapter_file,
            "snapshots": snapshot_entries,
        }
        atomic_write_text(self.state_path, json.dumps(record, indent=1, allow_nan=False) + "\n")
        keep = {STATE_FILE, adapter_file, *(entry["file"] for entry in snapshot_entries.values())}
        for path in self.directory.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)
        logger.debug(
            "checkpoint %d written (%s) in %.3fs",
            self.sequence,
            state.get("next", "?"),
            time.perf_counter() - started,
        )

    def read_state(self) -> dict[str, Any] | None:
        """``state.json``, or ``None`` when the run was killed before its first checkpoint."""
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AlignError(
                f"{self.state_path}: unreadable checkpoint ({exc}); the run cannot be resumed"
            ) from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise AlignError(
                f"{self.state_path}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'} "
                f"is not {FORMAT}; resume it with the align version that started it"
            )
        self.field(state, "status", str, "the run's status")
        self.field(state, "sequence", int, "a number")
        self._file(state.get("adapter"), "adapter")
        snapshots = state.get("snapshots", {})
        if not isinstance(snapshots, Mapping):
            raise AlignError(f"{self.state_path}: snapshots: not a mapping; {DAMAGED}")
        for step, entry in snapshots.items():
            self._file(entry.get("file") if isinstance(entry, Mapping) else None, f"snapshots.{step}.file")
        self.sequence = int(state["sequence"])
        return state

    def field(self, state: Mapping[str, Any], key: str, kind: Any, what: str, *default: Any) -> Any:
        """``state[key]``, refused as damage when it is missing (and has no ``default``) or not of
        ``kind`` (a ``state.json`` without ``status`` was a ``KeyError``)."""
        if key not in state and default:
            return default[0]
        value = state.get(key)
        if key not in state or isinstance(value, bool) or not isinstance(value, kind):
            shown = "missing" if key not in state else f"{json.dumps(value, default=str)[:40]} is not {what}"
            raise AlignError(f"{self.state_path}: {key}: {shown}; {DAMAGED}")
        return value

    def _file(self, name: Any, key: str) -> Path:
        """The file of ``checkpoint/`` that ``state.json`` names under ``key``: only a plain file
        name is read (``../../etc/passwd`` names a file outside the run)."""
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
            shown = f"'{name[:200]}'" if isinstance(name, str) else json.dumps(name, default=str)[:200]
            raise AlignError(
                f"{self.state_path}: {key}: {shown} is not a file in {self.directory}; {DAMAGED}"
            )
        return self.directory / name

    def load(self, state: Mapping[str, Any]) -> Checkpoint:
        """The weights ``state`` names, read back through the policy, and the position and results
        it records (each checked, so a damaged ``state.json`` is one line, not a ``KeyError``)."""
        adapter = self._load(self._file(state["adapter"], "adapter"))
        snapshots = {
            step: (
                self._load(self._file(entry["file"], f"snapshots.{step}.file")),
                dict(self.field(entry, "metrics", Mapping, "a mapping of metrics")),
            )
            for step, entry in state["snapshots"].items()
        }
        for key, kind, what in (
            ("topics", str, "a digest of the topics"),
            ("results", list, "a list of results"),
            ("current", (Mapping, type(None)), "a topic's results or null"),
            ("started", str, "a time"),
            ("seconds", (int, float), "a number"),
            ("topic_index", int, "a number"),
            ("step_index", int, "a number"),
        ):
            self.field(state, key, kind, what)
        return Checkpoint(state=dict(state), adapter=adapter, snapshots=snapshots)

    def _load(self, path: Path) -> Any:
        """One weights file of the checkpoint through the policy; a missing one is damage."""
        if not path.is_file():
            raise AlignError(f"{path}: missing, though state.json names it; {DAMAGED}")
        return self.policy.load_snapshot(path)
