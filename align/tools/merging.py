"""``align merge``: a saved adapter merged into its base model, saved as a standalone model."""

from __future__ import annotations

import os
from pathlib import Path

from align.errors import AlignError
from align.tools.loading import load


def check_empty_output(output: str | Path) -> Path:
    """Refuse an output path that is a file or a directory with anything in it."""
    output = Path(output)
    if output.is_symlink():  # to a directory, or to nothing: the rename into place would replace the link
        target = os.readlink(output)
        raise AlignError(
            f"{output}: a link to {target}; give a directory (new or empty) itself as --output, not a link"
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AlignError(f"{output}: output exists and is not empty; choose another --output or remove it")
    return output


def merge(adapter: str | Path, output: str | Path, *, model: str | None = None) -> Path:
    """Merge a saved adapter (:func:`run_adapter` finds a run's) into its base model and save a
    standalone Hugging Face model.

    The directory holds safetensors weights, the config, the generation config, the
    tokenizer with its chat template and a model card (``README.md``); ``AutoModelForCausalLM.from_pretrained`` loads it. It is
    written into a staging directory beside ``output`` and renamed into place, so ``output`` is
    either absent or complete.
    """
    from align.card import run_card
    from align.core.rundir import staged_directory
    from align.hf.policy import safetensors_os_errors

    output = check_empty_output(output)
    loaded = load(adapter, model, full_precision=True)  # a QLoRA run merges into the full weights
    merged = loaded.model.merge_and_unload()
    try:
        with staged_directory(output, readable=True) as staging:
            with safetensors_os_errors(output / "model.safetensors"):
                merged.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
            (staging / "README.md").write_text(run_card("merged", Path(adapter)), encoding="utf-8")
            pickled = [p.name for p in staging.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
            if pickled:  # align writes no pickle; a library that did would be a bug to catch here
                raise AlignError(f"{output}: refusing to write pickled weights ({', '.join(pickled)})")
            check_empty_output(output)  # nothing appeared there while the model was merging
    except BaseException as exc:
        from align.core.runner import WRITE_ERRNOS

        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # disk full: one line, nothing kept
            raise AlignError(
                f"{output}: could not write {exc.filename or 'the merged model'}: {exc.strerror}; "
                "nothing was kept: fix that and merge again"
            ) from exc
        raise
    return output
