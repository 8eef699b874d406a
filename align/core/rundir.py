"""The run directory: what a run leaves, written so that nothing is ever half-written.

``config.yaml`` and ``summary.json`` are written to a temporary name and renamed into place;
``metrics.jsonl`` gets one line per event, flushed as it happens; adapters are saved into a
staging directory and renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from align.errors import AlignError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """``runs/<name>/``: config.yaml, metrics.jsonl, summary.json, adapters/<topic>/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def adapter_dir(self, topic: str) -> Path:
        return self.path / "adapters" / topic

    @property
    def scratch_dir(self) -> Path:
        return self.path / ".scratch"

    def check_writable(self) -> None:
        """Refuse a directory that already holds a run, or one that cannot be created."""
        if self.path.exists() and not self.path.is_dir():
            raise AlignError(f"{self.path}: output path is a file; choose another --output")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise AlignError(
                f"{self.path}: output directory already exists and is not empty; choose another --output "
                "or remove it"
            )
        probe = self.path
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise AlignError(
                f"{self.path}: output directory is not writable (no write permission on {probe})"
            )

    def create(self, config_yaml: str) -> None:
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def record(self, event: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(event, sort_keys=False) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        metrics = getattr(self, "_metrics", None)
        if metrics is not None and not metrics.closed:
            os.fsync(metrics.fileno())
            metrics.close()
