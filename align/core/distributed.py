"""The processes of a run launched on several devices (``accelerate launch``, ``torchrun``).

A launcher starts one ``align run`` per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Every process runs the same topic loop on the same
config: the trainers make training steps data-parallel, :class:`~align.hf.language_model.HFLanguageModel`
shards scoring across the processes and gathers the results in order, the engine takes gate and
rollback decisions on the main process and broadcasts them, and only the main process writes the
run directory and prints.

One process (no launcher) is the common case, and every function here is then a no-op that
imports nothing: ``world_size()`` reads the environment. With more than one process the work that
takes torch and accelerate (joining the process group, moving objects between the processes) is
:mod:`align.hf.processes`'s, imported here at the point of use; this module imports neither.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

from align import compat

T = TypeVar("T")

_state: Any = None


def world_size() -> int:
    """How many processes run this run (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    """This process's number, 0 to ``world_size() - 1``; 0 is the main process."""
    if world_size() == 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Whether this process writes the run directory and prints (always, with one process)."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def sharded_parameters() -> str | None:
    """The launcher's parameter sharding (FSDP, DeepSpeed ZeRO-3), named, or ``None`` without it."""
    if compat.launched_with_fsdp():
        return "FSDP"
    if compat.launched_with_deepspeed() and _zero_stage() == "3":
        return "DeepSpeed ZeRO-3"
    return None


def _zero_stage() -> str | None:
    """The DeepSpeed ZeRO stage of the launch: from accelerate's own settings, or, when the
    accelerate config names a DeepSpeed config file (``deepspeed_config_file``), from that file."""
    stage = compat.launched_zero_stage()
    if stage is not None:
        return stage
    path = compat.launched_deepspeed_config_file()
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            stage = json.load(handle).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None  # DeepSpeed itself says what is wrong with the file
    return None if stage is None else str(stage)


def lockstep() -> bool:
    """Whether every process must run every forward pass of an evaluation (FSDP).

    FSDP shards the weights across the processes and gathers each layer's for its forward pass, so
    a forward pass needs every process at once: scoring is then not split across the processes
    (each scores every item, in the same order) and generation runs in step (``synced_gpus``).
    """
    return sharded_parameters() == "FSDP"  # ZeRO-3, the other sharding, is refused (check_launch)


def check_launch() -> None:
    """Refuse a sharded launch align cannot run: FSDP 1, FSDP on one process, DeepSpeed ZeRO-3.

    align gathers the sharded adapter (snapshots, checks, saves) from FSDP 2's DTensors. FSDP 1
    keeps flattened parameters and ZeRO-3 DeepSpeed's own partitions, which it does not gather;
    FSDP 2 gives the same sharding.
    """
    from align.errors import AlignError

    sharding = sharded_parameters()
    if sharding == "FSDP" and compat.launched_fsdp_version() != "2":
        raise AlignError(
            "launched with FSDP version 1, which align does not support (it gathers the sharded adapter "
            "from FSDP 2's DTensors): set fsdp_version: 2 in the accelerate config, as "
            "configs/accelerate/fsdp.yaml does (docs/scaling.md)"
        )
    if sharding == "FSDP" and not is_distributed():
        raise AlignError(
            "launched with FSDP on one process, which has nothing to shard the weights across: launch "
            "with --num_processes 2 or more, or without FSDP (docs/scaling.md)"
        )
    if sharding == "DeepSpeed ZeRO-3":
        raise AlignError(
            "launched with DeepSpeed ZeRO-3, which align does not support (it gathers the sharded adapter "
            "from FSDP 2's DTensors, not DeepSpeed's partitions): launch with configs/accelerate/fsdp.yaml "
            "for the same sharding, or ddp.yaml / zero2.yaml (docs/scaling.md)"
        )


def setup() -> Any:
    """Join the other processes (once): accelerate's ``PartialState``, which the trainers share
    (made by :func:`align.hf.processes.join`).

    It picks the backend (NCCL on GPUs, gloo on CPUs) and this process's device. With one
    process, nothing happens and ``None`` is returned.
    """
    global _state
    if not is_distributed():
        return None
    if _state is None:
        from align.hf import processes

        _state = processes.join()
    return _state


def device() -> str:
    """The device this process computes on: its own GPU under a launcher, else cuda or cpu."""
    from align.hf import processes

    return processes.device(setup())


def gather_objects(items: list[T]) -> list[T]:
    """Every process's ``items``, concatenated in rank order, on every process.

    Items travel as JSON (numbers, strings, lists, mappings; a tuple arrives as a list), never
    pickled: floats survive exactly.
    """
    if not is_distributed():
        return list(items)
    from align.hf import processes

    return processes.gather_objects(list(items))


def broadcast_object(obj: T) -> T:
    """The main process's ``obj`` on every process (its own value with one process); as JSON,
    like :func:`gather_objects`."""
    if not is_distributed():
        return obj
    from align.hf import processes

    return processes.broadcast_object(obj)


def max_over_processes(value: int) -> int:
    """The largest of every process's ``value`` (``value`` itself with one process)."""
    if not is_distributed():
        return value
    from align.hf import processes

    return processes.max_over_processes(value)


def barrier() -> None:
    """Wait until every process gets here."""
    if not is_distributed():
        return
    from align.hf import processes

    setup()
    processes.barrier()


def shutdown() -> None:
    """Leave the process group once every process is done, so none exits while another still
    talks to it (gloo aborts a process whose peer vanished mid-teardown)."""
    global _state
    if _state is None:
        return
    from align.hf import processes

    processes.leave()
    _state = None


def shard(count: int, parts: int | None = None, index: int | None = None) -> range:
    """The contiguous slice of ``range(count)`` that process ``index`` of ``parts`` takes.

    The first ``count % parts`` processes take one item more; slices are in rank order, so
    concatenating every process's results restores the original order.
    """
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (1 if index < extra else 0))
