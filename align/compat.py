"""Every private or undocumented part of TRL, transformers, peft and accelerate that align leans on.

Each is one small function (or constant) here, so that a new version of a library that moves one
breaks one place, and ``tests/test_compat.py`` says which ("TRL 1.17 changed ..."). Nothing is
imported at module level: the CLI imports this module, and ``align --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

#: The adapter name under which TRL's DPO and KTO trainers copy the policy's ``default`` adapter
#: to use as their reference, when handed a PEFT model and no ``ref_model`` (``add_adapter("ref", ...)``
#: in their ``__init__``, ``adapter_name="ref"`` in their reference passes). Not a TRL setting.
REFERENCE_ADAPTER = "ref"

#: The loss types TRL's ``DPOTrainer`` implements (its ``loss_type == ...`` branches); TRL exports no
#: list, and align checks a config's ``loss_type`` against this before a trainer is built.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)

#: The loss types TRL's ``KTOConfig.loss_type`` accepts (its field's ``choices``).
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@contextlib.contextmanager
def fused_lm_head_compact_on_cpu() -> Iterator[None]:
    """Make TRL's fused LM head take its compact path (labelled positions only) on a CPU too.

    Wraps TRL's private ``trl.trainer.utils._use_triton(device)``, which its chunked log-prob
    function calls, through that module's global, to choose between scoring only the labelled
    positions (Triton devices) and every position. The switch is widened to CPUs for the duration
    and put back afterwards; where a TRL version no longer has it, nothing changes.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def chunked_log_probs(
    hidden: Any, weight: Any, bias: Any, labels: Any, outputs: Sequence[str]
) -> tuple[Any, ...]:
    """Per-token ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` of ``labels`` under
    the LM head ``weight``/``bias`` applied to ``hidden`` (one row per token), in chunks with their
    own backward, never materialising the full-vocabulary logits; fields not in ``outputs`` are None.

    TRL's ``trl.kernels.ChunkedLogProbFunction`` (the kernel behind its fused LM head, an autograd
    function called with ``temperature``, chunk size, softcapping and logit scale) at temperature 1,
    no softcapping, scale 1, with the chunk size TRL's own head uses (its private
    ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``): the numbers TRL's DPO forward gives.
    """
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 1.0, chunk, None, 1.0, tuple(outputs))


def fused_output(**fields: Any) -> Any:
    """TRL's ``FusedCausalLMOutput`` (what a model patched with its fused LM head returns) from ``fields``."""
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


def dpo_reference_logps(trainer: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """The reference log-probs ``(chosen, rejected)`` of a collated batch of ``trainer``'s pairs.

    Wraps ``DPOTrainer.compute_ref_log_probs(model, inputs)``, a public-looking but undocumented
    method of TRL's (its own per-batch reference pass, through the ``ref`` adapter copy).
    """
    return trainer.compute_ref_log_probs(trainer.model, batch)


def use_dpo_reference_logps(trainer: Any, chosen: Sequence[float], rejected: Sequence[float]) -> None:
    """Have ``trainer`` read its reference log-probs from its training dataset instead of computing them.

    TRL's DPO collator passes the dataset columns ``ref_chosen_logps``/``ref_rejected_logps`` on to
    the batches, and the loss reads them when the trainer's ``precompute_ref_logps`` attribute is
    set (which ``precompute_ref_log_probs=True`` sets, after TRL's own precompute): both are internals.
    """
    trainer.train_dataset = trainer.train_dataset.add_column("ref_chosen_logps", list(chosen)).add_column(
        "ref_rejected_logps", list(rejected)
    )
    trainer.precompute_ref_logps = True


def is_adapter_weight(name: str, adapter: str = "default") -> bool:
    """Whether the parameter ``name`` of a PEFT model is a LoRA weight of ``adapter``.

    Relies on PEFT's parameter naming, which it does not document: a LoRA layer keeps its weights in
    ``lora_A``/``lora_B`` (``lora_embedding_*``, ``lora_magnitude_vector``) keyed by adapter name, so
    they are named ``...q_proj.lora_A.default.weight``.
    """
    return "lora_" in name and f".{adapter}." in name


class LoraLayer(NamedTuple):
    """One LoRA layer of an adapter, as :func:`lora_layers` finds it."""

    #: The layer's module name in the PEFT model (``base_model.model.model.layers.0.self_attn.q_proj``).
    peft_name: str
    #: The same module's name in the base model (``model.layers.0.self_attn.q_proj``).
    base_name: str
    a: Any
    b: Any
    scaling: float
    dora: bool


def lora_layers(peft_model: Any, adapter: str) -> Iterator[LoraLayer]:
    """Every LoRA layer of ``adapter`` in ``peft_model``, with its A and B weights and scaling.

    Reads PEFT's ``LoraLayer`` internals: its ``lora_A``/``lora_B`` module dicts, its ``scaling`` and
    ``use_dora`` dicts (by adapter name), and the ``base_model.model.`` prefix of its module names.
    """
    for module_name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        yield LoraLayer(
            peft_name=module_name,
            base_name=module_name.split("base_model.model.", 1)[-1],
            a=lora_a[adapter].weight,
            b=module.lora_B[adapter].weight,
            scaling=float(module.scaling[adapter]),
            dora=bool(getattr(module, "use_dora", {}).get(adapter)),
        )


def fsdp2_prepare(model: Any) -> Any:
    """Shard ``model`` with FSDP 2 as the launcher's accelerate config says.

    Wraps ``accelerate.utils.fsdp2_prepare_model(accelerator, model)``, accelerate's internal step of
    ``Accelerator.prepare`` (exported, undocumented), so the model is sharded before any trainer exists.
    """
    from accelerate import Accelerator
    from accelerate.utils import fsdp2_prepare_model

    return fsdp2_prepare_model(Accelerator(), model)


def disable_fsdp_auto_wrap() -> None:
    """Tell every later FSDP preparation in this process to wrap no layers (the model is sharded).

    accelerate's ``FullyShardedDataParallelPlugin`` reads its wrap policy from the launcher's
    environment variable ``FSDP_AUTO_WRAP_POLICY``; ``NO_WRAP`` means none.
    """
    os.environ["FSDP_AUTO_WRAP_POLICY"] = "NO_WRAP"


def cache_rows(cache: Any, index: Any, config: Any) -> Any:
    """A new KV cache holding rows ``index`` (repeats allowed) of ``cache``, which stays as it is.

    Reads transformers' ``DynamicCache.layers[i].keys``/``.values`` and builds the new cache with
    ``DynamicCache(ddp_cache_data=[(keys, values), ...], config=...)``, an argument meant for DDP.
    """
    from transformers import DynamicCache

    return DynamicCache(
        ddp_cache_data=[
            (layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers
        ],
        config=config,
    )


def tensorboard_callback(directory: str) -> Any:
    """transformers' TensorBoard callback, writing to ``directory``.

    Transformers 5's ``TensorBoardCallback`` takes no directory (it reads ``TENSORBOARD_LOGGING_DIR``
    from the environment, for the whole process); its ``logging_dir`` attribute, set before training
    begins, is where it then writes.
    """
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = directory
    return callback


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1")


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` started this process with FSDP (it sets ``ACCELERATE_USE_FSDP``
    for the processes it starts: accelerate's launcher-to-process protocol, undocumented)."""
    return _flag("ACCELERATE_USE_FSDP")


def launched_fsdp_version() -> str:
    """The FSDP version of the launch, from ``FSDP_VERSION`` (accelerate's default when unset: ``1``)."""
    return os.environ.get("FSDP_VERSION", "1")


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with DeepSpeed (``ACCELERATE_USE_DEEPSPEED``)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def launched_zero_stage() -> str | None:
    """The DeepSpeed ZeRO stage the accelerate config gives (``ACCELERATE_DEEPSPEED_ZERO_STAGE``), if any."""
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")


def launched_deepspeed_config_file() -> str | None:
    """The DeepSpeed config file the accelerate config names (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), if any."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def accelerate_launch_module() -> str:
    """The module that ``accelerate launch`` runs (``python -m`` it with this interpreter, so the
    launch does not depend on which ``accelerate`` script is first on ``PATH``)."""
    return "accelerate.commands.launch"


def accelerate_default_config_file() -> str:
    """Where ``accelerate config`` writes its config, which ``accelerate launch`` reads when given none.

    Wraps ``accelerate.commands.config.default_config_file``, read at each call.
    """
    from accelerate.commands import config

    return str(config.default_config_file)
