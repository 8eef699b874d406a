"""The CPU threads a run computes with, and the other align runs sharing the machine.

torch starts one compute thread per core. Two runs on one machine then ask for twice the cores
there are, and each thread that waits for a core it shares spins: on the project's 2-core
machine two runs side by side each ran several times slower than one alone (docs/performance.md
measures it). ``threads`` (a config key, ``auto`` by default) sets how many threads a run
computes with, and each run that loads a model says so in a file under ``$ALIGN_CACHE/running/``
(named by host and pid) for as long as it runs, so a run that starts beside another warns: run
one at a time, or give each its share of the cores.

This module keeps those files and words the warning; the core layer imports no torch, so the
runner sets the threads (:func:`align.hf.loading.set_threads`) and names the folder.

The thread count is never chosen behind the user's back: sums split across threads add in
another order, so a run's last bits depend on its thread count, and the same seed must give the
same result whatever else is running.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The folder of align's cache (``$ALIGN_CACHE``) where each running align process (one that
#: loads a model) leaves a file named by its host and pid.
RUNNING_DIR = "running"


def cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


def others(directory: Path) -> list[dict[str, Any]]:
    """The other align processes running on this machine, as their files in ``directory`` say
    (each ``{"pid", "host", "threads", "command", "started"}``); files left by processes that
    have ended are removed."""
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
            pid = int(entry["pid"])
            entry["threads"] = int(entry["threads"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: not a run to count
        if entry.get("host") != socket.gethostname():
            continue  # a cache shared between machines: another machine's run uses its own cores
        if pid == os.getpid():
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.append(entry)
    return found


@contextlib.contextmanager
def registered(threads: int, directory: Path) -> Iterator[None]:
    """Say in ``directory``, for as long as the block runs, that this process computes with
    ``threads`` threads. A directory that cannot be written only means other runs will not see
    this one."""
    host = socket.gethostname()
    path = directory / f"{host}-{os.getpid()}.json"
    entry = {
        "pid": os.getpid(),
        "host": host,
        "threads": threads,
        "command": " ".join(sys.argv[:3]),
        "started": time.time(),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry))
        written = True
    except OSError:
        written = False
    try:
        yield
    finally:
        if written:
            with contextlib.suppress(OSError):
                path.unlink()


def crowding(threads: int, running: list[dict[str, Any]], available: int) -> str | None:
    """A warning when this run's ``threads`` and those of the ``running`` align processes come to
    more than the ``available`` cores, else ``None``."""
    theirs = sum(entry["threads"] for entry in running)
    if not running or threads + theirs <= available:
        return None
    who = ", ".join(f"pid {entry['pid']} ({entry['threads']} threads)" for entry in running)
    share = max(1, available // (len(running) + 1))
    return (
        f"{len(running)} other align run{'s are' if len(running) > 1 else ' is'} computing on this "
        f"machine ({who}): with this run's {threads} that is {threads + theirs} threads on {available} "
        f"cores, and each run will be several times slower; run one at a time, or give each run its "
        f"share with `--set threads={share}` (the thread count can change a result's last digits)"
    )
