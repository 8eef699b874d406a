"""The torch and accelerate side of a multi-process launch: joining the process group and moving
objects between the processes. :mod:`align.core.distributed` decides when (never with one
process, except :func:`device`) and calls these; code outside it calls that module, not this one.
"""

from __future__ import annotations

import json
from typing import Any

from align.core import distributed


def join() -> Any:
    """accelerate's ``PartialState`` for this process, which the trainers share."""
    import torch
    from accelerate import PartialState

    # The same choice as the trainers' ``use_cpu``, so they find this state and keep it.
    return PartialState(cpu=not torch.cuda.is_available())


def device(state: Any) -> str:
    """The device of ``state`` (the process group's), else cuda or cpu."""
    import torch

    if state is not None:
        return str(state.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def gather_objects(items: list[Any]) -> list[Any]:
    """See :func:`align.core.distributed.gather_objects`."""
    import torch
    import torch.distributed as dist

    world_size = distributed.world_size()
    payload = _encode(items)
    sizes = [torch.zeros(1, dtype=torch.long, device=payload.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.long, device=payload.device))
    width = int(max(size.item() for size in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=payload.device)
    padded[: payload.numel()] = payload
    parts = [torch.zeros(width, dtype=torch.uint8, device=payload.device) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return [item for part, size in zip(parts, sizes) for item in _decode(part[: int(size.item())])]


def broadcast_object(obj: Any) -> Any:
    """See :func:`align.core.distributed.broadcast_object`."""
    import torch
    import torch.distributed as dist

    payload = _encode(obj if distributed.is_main() else None)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=payload.device)
    dist.broadcast(size, src=0)
    if not distributed.is_main():
        payload = torch.zeros(int(size.item()), dtype=torch.uint8, device=payload.device)
    dist.broadcast(payload, src=0)
    return _decode(payload)


def _encode(obj: Any) -> Any:
    import torch

    data = json.dumps(obj).encode("utf-8")
    # NCCL moves GPU tensors only; gloo moves CPU ones: this process's device suits its backend.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(distributed.device())


def _decode(tensor: Any) -> Any:
    return json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))


def max_over_processes(value: int) -> int:
    """See :func:`align.core.distributed.max_over_processes`."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=distributed.device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every process gets here (the process group joined)."""
    import torch.distributed as dist

    dist.barrier()


def leave() -> None:
    """Leave the process group once every process is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
