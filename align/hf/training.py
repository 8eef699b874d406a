"""Helpers for objectives that train with a Hugging Face / TRL trainer."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

from align import compat
from align.compat import REFERENCE_ADAPTER

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def reference_from_policy(model: Any) -> Iterator[None]:
    """Let a TRL preference trainer use the policy as it stands as its reference, then clean up.

    Handed a PEFT model and no ``ref_model``, TRL's DPO and KTO trainers copy the trained adapter
    under the name ``ref``: a reference equal to the policy at the start of the step, for the
    price of a rank-1 adapter instead of a second model. The copy is removed afterwards (also
    after a failure), so the next step starts from its own reference, and ``default`` is active.

    Under FSDP the ``ref`` adapter is made once, when the model is sharded (see
    :func:`shard_model`), so that FSDP shards it like ``default``: an adapter added later would be
    whole on each process beside sharded ones, which TRL's copy cannot mix. It then stays for the
    run; the trainer is told it exists and copies the policy into it, shard by shard.
    """
    if getattr(model, "align_sharded", False):
        add_adapter = model.add_adapter

        def add_unless_there(name: str, config: Any, *args: Any, **kwargs: Any) -> None:
            if name not in model.peft_config:
                add_adapter(name, config, *args, **kwargs)

        model.add_adapter = add_unless_there
        try:
            yield
        finally:
            del model.add_adapter  # the class's method again
            model.set_adapter("default")
        return
    if REFERENCE_ADAPTER in model.peft_config:  # left over from an interrupted step
        model.delete_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        if REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")


def shard_model(model: Any) -> Any:
    """Shard a PEFT model across the processes with FSDP 2, as the launcher's config says
    (accelerate's own preparation, which the trainers then find done), before anything runs on it.

    Sharding now, not at the first training step, means no process ever holds the whole model on
    its device: the evaluation before training already runs on the shards, and with
    ``fsdp_cpu_ram_efficient_loading`` the other processes' empty (meta) weights are filled from
    the main process's. The ``ref`` adapter of the preference trainers is added first, frozen, so
    that it is sharded with the rest (see :func:`reference_from_policy`).
    """
    if REFERENCE_ADAPTER not in model.peft_config:
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config["default"])
    model.set_adapter("default")
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
    model = compat.fsdp2_prepare(model)
    model.align_sharded = True
    # Each trainer prepares the model again and finds it sharded, but first looks for the layers
    # to wrap by class name, which sharding changed (LlamaDecoderLayer is FSDPLlamaDecoderLayer
    # now): nothing is left to wrap, and its FSDP settings, read from the environment, say so.
    compat.disable_fsdp_auto_wrap()
    return model


def conversation(prompt: str, answer: str, chat: bool) -> dict[str, Any]:
    """A prompt and an answer in TRL's format: conversational when the model has a chat template."""
    if chat:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": answer}],
        }
    return {"prompt": prompt, "completion": answer}


def quiet_trainer(trainer: Any) -> Any:
    """Remove the trainer's own console printing; the engine shows progress from the logs."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def completion_tokens_only() -> Iterator[None]:
    """Let TRL's fused LM head score only the tokens it is asked about, on a CPU too.

    TRL computes per-token log-probabilities with a chunked LM head (``fused_lm_head=True``).
    Except on Triton devices it runs every position of the batch through the head, prompt and
    padding included, to keep tile shapes fixed for compilers; on a CPU the head over the full
    vocabulary is then about a third of a DPO step (measured on SmolLM2-135M). Scoring only the
    labelled positions gives the same log-probabilities for a fraction of the work. TRL decides
    with its private ``_use_triton`` (see :func:`align.compat.fused_lm_head_compact_on_cpu`); this
    widens it to CPUs for the duration and leaves TRL as it was afterwards, or does nothing where a
    TRL version no longer has it.
    """
    with compat.fused_lm_head_compact_on_cpu():
        yield


def count_parameters_once(trainer: Any) -> None:
    """Make the trainer's per-step FLOP estimate count the model's parameters once, not every step.

    transformers' ``Trainer.floating_point_ops`` (``6 x tokens x parameters``, for the
    ``total_flos`` it logs) calls ``model.num_parameters()`` after every batch, which walks all
    of the model's modules: on a 135M model at batch 1 a measurable share of a short SFT step.
    The parameters do not change while a trainer trains, so the count is taken at the first
    batch and kept; the estimate is the same number.
    """
    model = trainer.model
    name = getattr(model, "main_input_name", "input_ids")
    if not hasattr(model, "num_parameters"):
        return
    counted: list[int] = []

    def floating_point_ops(inputs: Mapping[str, Any]) -> int:
        if name not in inputs:
            return 0
        if not counted:
            counted.append(model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[name].numel() * counted[0]

    trainer.floating_point_ops = floating_point_ops


def train_and_summarise(trainer: Any, keys: Mapping[str, str]) -> dict[str, float]:
    """Run ``trainer.train()`` and return the run's metrics.

    ``loss`` is the mean training loss, ``first_loss`` and ``final_loss`` the first and last logged
    losses, ``steps`` the optimizer steps taken; ``keys`` maps further names to log keys whose
    last logged value is reported (``{"reward_margin": "rewards/margins"}``).
    """
    quiet_trainer(trainer)
    count_parameters_once(trainer)
    with completion_tokens_only():
        output = trainer.train()
    accelerator = trainer.accelerator
    logger.info(
        "%s: %d optimizer steps on %d process%s (%s)",
        type(trainer).__name__,
        output.global_step,
        accelerator.num_processes,
        "" if accelerator.num_processes == 1 else "es",
        accelerator.distributed_type.value,
    )
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "loss": float(output.training_loss),
        "steps": float(output.global_step),
    }
    if logs:
        metrics["first_loss"] = float(logs[0]["loss"])
        metrics["final_loss"] = float(logs[-1]["loss"])
        for name, key in keys.items():
            if key in logs[-1]:
                metrics[name] = float(logs[-1][key])
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
