"""The run directory: what a run leaves, written so that nothing is ever half-written.

``config.yaml``, ``topics.json`` and ``summary.json`` are written to a temporary name and renamed
into place; ``metrics.jsonl`` gets one line per event, flushed as it happens; adapters are saved
into a staging directory and renamed; ``checkpoint/`` (see :mod:`align.core.checkpoint`) says
where the run stands. While a run writes into the directory it holds a lock on ``.lock`` (through ``filelock``), which
the operating system releases when the process ends, however it ends.

Under a multi-process launch (``accelerate launch``, ``torchrun``) only the main process writes:
the others hold a ``RunDir`` that records nothing, so each file has one writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.core import distributed
from align.errors import AlignError

#: What ``tempfile.mkstemp``/``mkdtemp`` name a staging file or directory beside its target: a dot,
#: the target's name, a dash and eight random characters.
STAGING_NAME = re.compile(r"\.[^/]+-[a-z0-9_]{8}")


def umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path | int, directory: bool = False) -> None:
    """Give a file (a path or a descriptor) or directory made by ``mkstemp``/``mkdtemp`` the mode
    ``open``/``mkdir`` would have: those are 0600/0700 whatever the umask, so a shared results
    folder could not read what a run wrote."""
    mode = (0o777 if directory else 0o666) & ~umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        usual_mode(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(target: Path, *, replace: bool = False, readable: bool = False) -> Iterator[Path]:
    """A new directory beside ``target`` to fill, renamed onto ``target`` when the block ends, so
    ``target`` is never seen half-written.

    An empty directory at ``target`` is replaced; with ``replace`` a full one too (moved aside,
    then deleted). With ``readable``, the directory and all it holds get the modes ``open`` and
    ``mkdir`` would have given (``mkdtemp`` makes it private). When the block raises, the staging
    directory is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if readable:
            usual_mode(staging, directory=True)
            for path in staging.rglob("*"):
                usual_mode(path, directory=path.is_dir())
        old = None
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / target.name)
        elif target.is_dir():
            target.rmdir()  # an empty one: a full one is an error here, never silently lost
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class RunDir:
    """``runs/<name>/``: config.yaml, topics.json, metrics.jsonl, summary.json, adapters/<topic>/,
    checkpoint/."""

    def __init__(self, path: str | Path, writer: bool | None = None):
        self.path = Path(path)
        #: Whether this process writes the run (the main one of a multi-process launch, or the only one).
        self.writer = distributed.is_main() if writer is None else writer
        self._lock: Any = None
        self._offset = 0
        #: sha256 of what metrics.jsonl holds, kept as lines are written: a checkpoint records it,
        #: so a resume can tell the log it cuts back is the one the checkpoint accounts for.
        self._digest = hashlib.sha256()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def adapter_dir(self, topic: str) -> Path:
        return self.path / "adapters" / topic

    @property
    def scratch_dir(self) -> Path:
        return self.path / ".scratch"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def topics_path(self) -> Path:
        return self.path / "topics.json"

    def lock(self) -> None:
        """Hold ``.lock`` until :meth:`close`; refuse when another align run holds it.

        The lock is :class:`filelock.FileLock`'s (``flock`` on POSIX), taken without waiting; the
        holder's pid is written into the lock file for the message another run prints."""
        import filelock

        self.check_lock_file()
        path = self.path / ".lock"
        lock = filelock.FileLock(path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                holder = path.read_text(encoding="utf-8").strip() or "unknown"
            except (OSError, ValueError):
                holder = "unknown"
            raise AlignError(
                f"{self.path}: another align run (pid {holder}) is writing to this run directory; "
                "wait for it to finish, or stop it, then try again"
            ) from None
        try:
            path.write_text(str(os.getpid()), encoding="utf-8")
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def check_lock_file(self) -> None:
        """Refuse a ``.lock`` that is not a file align can open (a directory of that name)."""
        lock = self.path / ".lock"
        if lock.is_dir():
            raise AlignError(f"{lock}: is a directory, not align's lock file; remove it, then try again")

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
            if probe.is_symlink():  # mkdir would fail on it with FileExistsError
                raise AlignError(
                    f"{probe}: a link to {os.readlink(probe)}, which does not exist; choose another "
                    "--output, or remove the link"
                )
            probe = probe.parent
        if not probe.is_dir():  # --output afile/sub: mkdir would fail with NotADirectoryError
            raise AlignError(
                f"{self.path}: {probe} is a file, so the output directory cannot be made inside it; "
                "choose another --output"
            )
        if not os.access(probe, os.W_OK):
            raise AlignError(
                f"{self.path}: output directory is not writable (no write permission on {probe}); "
                "choose another --output or fix the permissions"
            )

    def check_no_links_out(self) -> None:
        """Refuse a run directory holding a link that leads outside it (``adapters`` linked to
        another directory, say): a resumed run rewrites and deletes files under its directory, and
        must never do so in a directory it does not own."""
        root = self.path.resolve()
        for parent, dirs, files in os.walk(self.path):
            for name in sorted(dirs + files):
                entry = Path(parent) / name
                if not entry.is_symlink():
                    continue
                target = entry.resolve()
                if target != root and root not in target.parents:
                    raise AlignError(
                        f"{entry}: a link to {target}, outside the run directory, which align will not "
                        "write or delete through; replace the link with the directory or file itself, "
                        "then resume"
                    )

    def create(self, config_yaml: str, topics: list[dict[str, Any]] | None = None) -> None:
        """Start a new run: the recorded config and (for ``--resume``) the topics it trains on."""
        if not self.writer:
            return
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        atomic_write_text(self.path / "config.yaml", config_yaml)
        if topics is not None:
            self.write_topics(topics)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write_topics(self, topics: list[dict[str, Any]]) -> None:
        """``topics.json``: the topics the run trains on, every item inline (``--resume`` reads it)."""
        if not self.writer:
            return
        atomic_write_text(
            self.topics_path, json.dumps(topics, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        )

    def check_metrics(self, metrics_offset: int, metrics_sha256: str | None) -> None:
        """Refuse to resume over a ``metrics.jsonl`` that does not begin with the events the
        checkpoint accounts for (its first ``metrics_offset`` bytes, whose sha256 it recorded):
        cut back at that offset, an emptied log would silently lose the run's events, and one with
        a line inserted would be cut inside a real event."""
        path = self.metrics_path
        fix = "restore it (or start a new run), then resume"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < metrics_offset:
            raise AlignError(
                f"{path}: holds {size} bytes, but the run's checkpoint accounts for {metrics_offset} "
                f"bytes of events; the log was cut or emptied since the run stopped, and resuming would "
                f"lose those events: {fix}"
            )
        if metrics_offset == 0:
            return
        with open(path, "rb") as handle:
            prefix = handle.read(metrics_offset)
        if prefix[-1:] != b"\n" or (
            metrics_sha256 is not None and hashlib.sha256(prefix).hexdigest() != metrics_sha256
        ):
            raise AlignError(
                f"{path}: its first {metrics_offset} bytes are not the events the run's checkpoint "
                f"recorded; the log was edited since the run stopped, and resuming would cut it inside "
                f"an event: {fix}"
            )

    def reopen(self, metrics_offset: int) -> None:
        """Continue a run: lock it, and cut ``metrics.jsonl`` back to what the checkpoint accounts
        for (events of a step that did not finish, or a line torn by a crash)."""
        if not self.writer:
            self._offset = metrics_offset
            return
        self.lock()
        self.remove_staging()  # only while holding the lock: no other align is writing here
        with open(self.metrics_path, "a+b") as handle:
            handle.truncate(min(metrics_offset, handle.seek(0, os.SEEK_END)))
            handle.seek(0)
            self._digest = hashlib.sha256(handle.read())
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def remove_staging(self) -> list[Path]:
        """Delete what a killed process left half-written: the staging files and directories that
        atomic writes make beside their target (``.summary.json-k2x9q1ab``, ``adapters/.home-…``,
        ``checkpoint/.adapter-000003.safetensors-…``, a report's ``.plots-…``). A link is removed
        itself, never followed. Returns what was removed."""
        removed = []
        for directory in (self.path, self.path / "adapters", self.checkpoint_dir):
            if directory.is_symlink() or not directory.is_dir():
                continue
            for entry in sorted(directory.iterdir()):
                if not STAGING_NAME.fullmatch(entry.name):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def metrics_offset(self) -> int:
        """How many bytes of ``metrics.jsonl`` are written (and flushed) so far."""
        if not self.writer:
            return self._offset  # not what the main process wrote; only its checkpoints are kept
        return self._metrics.tell()

    def metrics_sha256(self) -> str:
        """The sha256 of what :meth:`metrics_offset` counts (the lines written so far)."""
        return self._digest.hexdigest()

    def record(self, event: dict[str, Any]) -> None:
        if not self.writer:
            return
        # allow_nan=False: a NaN or infinity would be a bare NaN that strict JSON parsers reject.
        line = json.dumps(event, sort_keys=False, allow_nan=False) + "\n"
        self._metrics.write(line)
        self._metrics.flush()
        self._digest.update(line.encode("utf-8"))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")

    def close(self) -> None:
        metrics = getattr(self, "_metrics", None)
        try:
            if metrics is not None and not metrics.closed:
                try:
                    os.fsync(metrics.fileno())
                finally:
                    metrics.close()
        finally:
            if self._lock is not None:
                with contextlib.suppress(OSError):
                    self._lock.release()  # the lock file stays: the next run takes the lock on it
                self._lock = None
