"""The engine's model as :class:`align.Policy`: the PEFT model with its one adapter, the trainers'
shared arguments and callbacks, adapter snapshots (for rollbacks and checkpoints) and saving."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from align.core import distributed
from align.core.rundir import staged_directory, usual_mode
from align.errors import ModelError, NonFiniteTraining
from align.hf.language_model import HFLanguageModel, shard_like, whole


@contextlib.contextmanager
def safetensors_os_errors(path: Path) -> Iterator[None]:
    """Raise a failed safetensors write as the :class:`OSError` it is: ``SafetensorError`` is not
    one, so a full disk while saving weights was a traceback instead of the run's "could not write
    ...; resume" line. safetensors says ``IoError(Os { code: 28, kind: StorageFull, ... })``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"\bcode: (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


class EnginePolicy:
    """The engine's model, handed to objectives as :class:`align.Policy`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        seed: int,
        scratch_dir: Path,
        on_log: Callable[[str, dict[str, float]], None] | None = None,
        eval_batch_size: int = 16,
        tensorboard_dir: Path | None = None,
        gradient_checkpointing: bool = False,
        report_to: Sequence[str] = (),
    ):
        self.model = model
        #: ``report_to``'s trackers other than TensorBoard (which the policy writes into the run):
        #: handed to every trainer as transformers' ``report_to``.
        self.report_to = [name for name in report_to if name != "tensorboard"]
        self.gradient_checkpointing = gradient_checkpointing
        self.tokenizer = tokenizer
        self.seed = seed
        self.scratch_dir = Path(scratch_dir)
        self._on_log = on_log
        #: ``report_to: tensorboard``: each training step logs to ``<tensorboard_dir>/<topic>-<step>``.
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        self._topic = "topic"
        self._recorder: Callable[[str, dict[str, Any]], None] | None = None
        self._language_model = HFLanguageModel(model, tokenizer, batch_size=eval_batch_size)

    @property
    def language_model(self) -> HFLanguageModel:
        return self._language_model

    def set_recorder(self, recorder: Callable[[str, dict[str, Any]], None] | None) -> None:
        """Where :meth:`record` sends events (the engine: the run's ``metrics.jsonl``)."""
        self._recorder = recorder

    def record(self, kind: str, **data: Any) -> None:
        """Record an event of ``kind`` about the step in progress (e.g. answers an objective
        generated), as the engine records its own."""
        if self._recorder is not None:
            self._recorder(kind, data)

    def set_log_target(
        self, on_log: Callable[[str, dict[str, float]], None] | None, topic: str | None = None
    ) -> None:
        """Where trainer logs go (the engine points this at the topic in progress)."""
        self._on_log = on_log
        if topic is not None:
            self._topic = topic

    def trainer_callbacks(self, step: str) -> list[Any]:
        from transformers import TrainerCallback

        policy = self

        class ForwardLogs(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if policy._on_log is not None and logs and "train_runtime" not in logs:
                    numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                    numbers["step"] = float(state.global_step)
                    numbers["max_steps"] = float(state.max_steps)
                    policy._on_log(step, numbers)

        class StopWhenNonFinite(TrainerCallback):
            """Stop training at the optimizer step where the loss, the gradient norm or an adapter
            weight stops being finite; the engine then restores the adapter from before the step."""

            def on_log(self, args, state, control, logs=None, **kwargs):
                for key in ("loss", "grad_norm"):
                    value = (logs or {}).get(key)
                    if isinstance(value, (int, float)) and not math.isfinite(value):
                        raise NonFiniteTraining(f"{key} became {value} at optimizer step {state.global_step}")

            def on_train_begin(self, args, state, control, **kwargs):
                # Looked up once a training, not every step (a walk over all the model's modules).
                self.adapter = list(policy._adapter_parameters().items())

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                adapter = getattr(self, "adapter", None) or list(policy._adapter_parameters().items())
                if not adapter:
                    return
                # One check for all the weights (a NaN or an infinity makes the sum non-finite),
                # then the weight to name, only when there is one.
                total = torch.stack([whole(param).detach().float().sum() for _, param in adapter]).sum()
                if bool(torch.isfinite(total)):
                    return
                for name, param in adapter:
                    if not bool(torch.isfinite(whole(param)).all()):
                        raise NonFiniteTraining(
                            f"adapter weight {name} became non-finite at optimizer step {state.global_step}"
                        )

        callbacks = [ForwardLogs(), StopWhenNonFinite()]
        if self.tensorboard_dir is not None:
            callbacks.append(self._tensorboard(step))
        return callbacks

    def _tensorboard(self, step: str) -> Any:
        """Transformers' own TensorBoard integration, writing to this step's directory of the run.

        (Transformers 5 has no ``logging_dir`` argument; its callback reads the directory from the
        environment, so the policy hands the trainer one with the directory set.) A step run again
        (``--resume``, a retry) starts its directory afresh, as metrics.jsonl drops the cut-off
        attempt's events."""
        from align import compat

        assert self.tensorboard_dir is not None
        directory = self.tensorboard_dir / f"{self._topic}-{step}"
        if distributed.is_main():  # the callback writes on the main process only
            shutil.rmtree(directory, ignore_errors=True)
        return compat.tensorboard_callback(str(directory))

    def trainer_args(self) -> dict[str, Any]:
        """Training arguments every objective shares: no checkpoints, the run's trackers, the run's seed."""
        import torch

        return {
            "output_dir": str(self.scratch_dir),
            "report_to": list(self.report_to) or "none",
            "save_strategy": "no",
            "logging_steps": 1,
            # The trainer would log a NaN loss as the mean of its finite neighbours; the NaN guard must see it.
            "logging_nan_inf_filter": False,
            "disable_tqdm": True,
            "seed": self.seed,
            "data_seed": self.seed,
            "bf16": False,
            "fp16": False,
            "use_cpu": not torch.cuda.is_available(),
            "dataloader_pin_memory": False,
            # TRL turns this on by default; for a rank-1 adapter on a small model it only costs time
            # (model.gradient_checkpointing: true trades it for activation memory on large ones).
            "gradient_checkpointing": self.gradient_checkpointing,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            # Under DDP every trained weight is the adapter's, and each gets a gradient every step.
            "ddp_find_unused_parameters": False,
        }

    def _adapter_parameters(self) -> dict[str, Any]:
        from align import compat

        return {
            name: param
            for name, param in self.model.named_parameters()
            if compat.is_adapter_weight(name, "default")
        }

    def snapshot(self) -> dict[str, Any]:
        """A copy of the trained adapter's weights (a few KB at rank 1), for :meth:`restore`.

        Under FSDP the adapter is sharded: its shards are gathered, so every process holds the
        whole copy (which takes every process: they all take snapshots at the same points)."""
        return {name: whole(param.detach()).clone() for name, param in self._adapter_parameters().items()}

    def fingerprint(self) -> str | None:
        """A digest of the adapter's weights as they are now, so the engine can reuse an evaluation
        of the same weights (:mod:`align.core.reuse`); ``None`` under a multi-process launch, where
        every process must make the same forward passes."""
        if distributed.is_distributed():
            return None
        import torch

        digest = hashlib.blake2b(digest_size=16)
        for name, param in sorted(self._adapter_parameters().items()):
            digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
            digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def restore(self, state: dict[str, Any]) -> None:
        """Put back the adapter weights from :meth:`snapshot`, exactly (each process its own shard
        of them under FSDP)."""
        import torch

        with torch.no_grad():
            for name, param in self._adapter_parameters().items():
                param.copy_(shard_like(state[name], param))

    def save_snapshot(self, state: dict[str, Any], path: Path) -> Path:
        """Write a :meth:`snapshot` as ``<path>.safetensors`` (for checkpoints), atomically."""
        from safetensors.torch import save_file

        target = Path(path).with_suffix(".safetensors")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        os.close(fd)
        try:
            with safetensors_os_errors(target):
                save_file({name: tensor.contiguous() for name, tensor in state.items()}, tmp)
            usual_mode(Path(tmp))  # mkstemp's 0600, kept by the write
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def load_snapshot(self, path: Path) -> dict[str, Any]:
        """Read a :meth:`save_snapshot` file back, refusing one that does not fit this adapter
        (another rank or set of modules) or holds NaN or infinite values: restored as it is, it
        would be trained on and saved as if nothing were wrong."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        device = next(self.model.parameters()).device
        damaged = "the checkpoint is damaged, so the run cannot be resumed: start a new run"
        try:
            state = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as exc:  # truncated: a torn or half-copied file
            raise ModelError(f"{path}: unreadable ({exc}); {damaged}") from None
        expected = {name: list(param.shape) for name, param in self._adapter_parameters().items()}
        for name, tensor in sorted(state.items()):
            if name not in expected:
                raise ModelError(f"{path}: {name}: not a weight of this run's adapter; {damaged}")
            if list(tensor.shape) != expected[name]:
                raise ModelError(
                    f"{path}: {name}: shape {list(tensor.shape)}, but this run's adapter has "
                    f"{expected[name]}; {damaged}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ModelError(f"{path}: {name}: holds NaN or infinite values; {damaged}")
        missing = sorted(set(expected) - set(state))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelError(f"{path}: lacks the adapter weight {missing[0]}{more}; {damaged}")
        return state

    def reseed(self, offset: int) -> None:
        """Seed every generator with ``seed + offset``: the engine does this before each step, so a
        step draws the same random numbers whether or not the run was resumed before it."""
        from transformers import set_seed

        set_seed(self.seed + offset)

    def save_adapter(self, directory: Path) -> None:
        """Save the ``default`` adapter as a PEFT directory (safetensors), written atomically.

        Every process calls this; the main process writes (under FSDP the adapter's shards are
        first gathered, which takes every process)."""
        state = self.snapshot()
        if not distributed.is_main():
            return
        directory = Path(directory)
        # Written whole beside ``directory`` and renamed onto it (an earlier save is replaced),
        # with the modes open and mkdir would have given, so a shared results folder can read it.
        with staged_directory(directory, replace=True, readable=True) as staging:
            with safetensors_os_errors(directory / "adapter_model.safetensors"):
                self.model.save_pretrained(
                    staging, selected_adapters=["default"], safe_serialization=True, state_dict=state
                )
            # PEFT nests non-default adapters in sub-folders; "default" lands at the top level.
            if directory.is_symlink():  # never delete what a link leads to
                raise ModelError(
                    f"{directory}: a link to {directory.resolve()}, which align will not delete through; "
                    "replace the link with the directory itself, then resume"
                )
