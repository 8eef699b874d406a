"""Loading ``(model, tokenizer)`` from ``model.path``, and attaching the run's rank-1 adapter."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.core import distributed
from align.errors import ModelError, closest
from align.hf.source import resolve_model_path


def pick_device() -> str:
    """This process's device: its own GPU under a multi-process launcher, else cuda or cpu."""
    return distributed.device()


def check_hardware(source: str, dtype: str = "float32", quantization: str = "none") -> None:
    """Refuse model options this machine cannot run, as one line naming the key and the fix.
    (``model.device_map`` with several processes is refused by the config check, before this.)"""
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "float16" and not cuda:
        raise ModelError(
            f"{source}: model.dtype: float16 needs a CUDA GPU and this machine has none; "
            "use float32 (or bfloat16)"
        )
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise ModelError(
            f"{source}: model.dtype: bfloat16 is not supported by this GPU ({torch.cuda.get_device_name()}); "
            "use float16 or float32"
        )
    if quantization != "none" and not cuda:
        raise ModelError(
            f"{source}: model.quantization: {quantization} base weights (bitsandbytes) need a CUDA GPU and "
            "this machine has none; set model.quantization: none"
        )


def load_model(
    spec: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    chat_template: bool | str = "auto",
    source: str = "config",
    quantization: str = "none",
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from ``model.path``; errors are :class:`ModelError` lines.

    Weights are read from safetensors only. ``chat_template`` is ``model.chat_template``:
    ``"auto"`` keeps the tokenizer's template, ``False`` drops it (plain-text prompts), and
    ``True`` requires one. ``quantization`` (``4bit``, ``8bit``) loads the frozen base weights
    through bitsandbytes (QLoRA; a CUDA GPU); ``device_map`` (``auto`` or a mapping) spreads the
    model over several devices, and then it is not moved afterwards.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_hardware(source, dtype, quantization)
    path = resolve_model_path(spec)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    options: dict[str, Any] = {}
    if quantization != "none":
        options["quantization_config"] = quantization_config(quantization, dtype)
        options["device_map"] = device_map if device_map is not None else {"": pick_device()}
    elif device_map is not None:
        options["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **options
        )
    except OSError as exc:
        offline = (
            " (HF_HUB_OFFLINE=1 is set: only local models load)"
            if os.environ.get("HF_HUB_OFFLINE") and not Path(path).is_dir()
            else ""
        )
        raise ModelError(f"{spec}: could not load the model{offline}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise ModelError(f"{spec}: could not load the model: {str(exc).splitlines()[0]}") from None
    except (SafetensorError, RuntimeError) as exc:
        raise ModelError(
            f"{spec}: the model's weights could not be read ({str(exc).splitlines()[0]}); the file is "
            "damaged or incomplete: save or download it again"
        ) from None
    if chat_template is False:
        tokenizer.chat_template = None
    elif chat_template is True and not tokenizer.chat_template:
        raise ModelError(
            f"{source}: model.chat_template: true, but the tokenizer of {spec} has no chat template; "
            "set model.chat_template: false to use plain-text prompts, or use an instruct model"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Placed by from_pretrained with a device map; under FSDP, sharding moves each process's share
    # of the weights to its device (the whole model never goes to one).
    if "device_map" not in options and not distributed.lockstep():
        model.to(pick_device())
    return model, tokenizer


def quantization_config(quantization: str, dtype: str) -> Any:
    """bitsandbytes settings for frozen ``4bit`` (NF4, QLoRA's) or ``8bit`` base weights."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, dtype) if dtype in ("bfloat16", "float16") else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def linear_module_names(model: Any) -> list[str]:
    """The short names of the model's linear layers, which LoRA can target."""
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return sorted(names)


def attach_adapter(
    model: Any,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    source: str = "config",
    gradient_checkpointing: bool = False,
) -> Any:
    """Wrap ``model`` with the run's one LoRA adapter (named ``default``).

    A quantized model is first prepared for training (``prepare_model_for_kbit_training``); with
    ``gradient_checkpointing`` the embeddings' outputs require grad, which checkpointed layers
    need when the only trainable weights are the adapter's.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    available = linear_module_names(model)
    for module in target_modules:
        if module not in available:
            raise ModelError(
                f"{source}: lora.target_modules: the model has no module '{module}'{closest(module, available)} "
                f"(it has: {', '.join(available)})"
            )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (transformers' ``set_seed``)."""
    from transformers import set_seed as seed_everything

    seed_everything(seed)


def set_threads(threads: int | str) -> int:
    """Set torch's compute threads to ``threads`` (``auto`` leaves torch's own choice, one per
    core); the count in use (see :mod:`align.core.machine`)."""
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def quiet_libraries() -> None:
    """Keep the libraries' own progress bars and notices out of align's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob pass reads this
    # Deprecation notices from inside transformers/TRL are for their authors, not align's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if logging.getLogger("align").isEnabledFor(logging.DEBUG):  # -vv: the libraries' notices too
        transformers.logging.set_verbosity_info()
        return
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
