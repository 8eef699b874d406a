"""Loading the base model with a saved adapter, and answering prompts with it.

The model settings come from the adapter's run (its ``config.yaml``), else the packaged default;
torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError, ModelError
from align.tools.runs import check_adapter, read_run_config, run_of_adapter


def default_model_settings() -> dict[str, Any]:
    """The model settings an adapter is loaded with when its run recorded none: the config's."""
    from align.core.settings import ModelSettings

    return asdict(ModelSettings())


def model_settings(adapter: str | Path | None = None, model: str | None = None) -> dict[str, Any]:
    """The ``model:`` settings to load with: the adapter's run's (``config.yaml``), else the
    packaged default; ``model`` (``--model``) replaces the path only."""
    settings = default_model_settings()
    run = run_of_adapter(adapter) if adapter is not None else None
    if run is not None:
        recorded = (read_run_config(run) or {}).get("model")
        if isinstance(recorded, Mapping):
            settings.update(recorded)
    if model is not None:
        settings["path"] = str(Path(model).resolve()) if Path(model).exists() else model
    return settings


@dataclass
class LoadedModel:
    """The base model (with the adapter attached as ``adapter_name``, when there is one)."""

    model: Any
    tokenizer: Any
    settings: dict[str, Any]
    adapters: dict[str, Path] = field(default_factory=dict)

    def language_model(self) -> Any:
        """The model as the :class:`align.LanguageModel` evaluators score (align's chat template use)."""
        from align.hf.language_model import HFLanguageModel

        chat = self.settings.get("chat_template", "auto")
        return HFLanguageModel(
            self.model,
            self.tokenizer,
            batch_size=int(self.settings.get("eval_batch_size", 16)),
            chat_template=chat if isinstance(chat, bool) else None,
        )

    def add_adapter(self, adapter: str | Path, name: str = "default") -> None:
        """Attach a saved adapter (the first one wraps the model in a PEFT model) and make it active."""
        from peft import PeftModel
        from safetensors import SafetensorError

        adapter = check_adapter(adapter)
        try:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
            else:
                self.model.load_adapter(str(adapter), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(
                f"{adapter}: does not fit the model {self.settings['path']} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass the --model "
                "the run trained on (its config.yaml model.path)"
            ) from None
        except (SafetensorError, OSError) as exc:  # cut short, overwritten, or a link to another file
            raise ModelError(
                f"{adapter}: the adapter's weights could not be read ({str(exc).splitlines()[0] if str(exc) else ''}); "
                "the file is damaged: save the adapter again, or restore it from a copy of the run"
            ) from None
        self.model.set_adapter(name)
        self.model.eval()
        self.adapters[name] = adapter

    @contextlib.contextmanager
    def bare(self) -> Iterator[None]:
        """The base model without any adapter, for as long as the context lasts."""
        if not self.adapters:
            yield
            return
        with self.model.disable_adapter():
            yield


def load(
    adapter: str | Path | None = None, model: str | None = None, *, full_precision: bool = False
) -> LoadedModel:
    """Load the base model (the adapter's run's, ``model``, or the packaged default) and attach
    ``adapter`` when given. Errors are one-line :class:`ModelError` s.

    ``full_precision`` loads the base weights unquantized and on one device whatever the run used
    (4-bit training, ``device_map``): what merging needs."""
    from align.core.runner import quiet_libraries
    from align.hf.loading import load_model

    if adapter is not None:
        adapter = check_adapter(adapter)
    settings = model_settings(adapter, model)
    if full_precision:
        settings.update(quantization="none", device_map=None)
    quiet_libraries()
    base, tokenizer = load_model(
        settings["path"],
        dtype=settings["dtype"],
        trust_remote_code=bool(settings["trust_remote_code"]),
        chat_template=settings.get("chat_template", "auto"),
        quantization=settings.get("quantization", "none"),
        device_map=settings.get("device_map"),
    )
    base.eval()
    loaded = LoadedModel(base, tokenizer, settings)
    if adapter is not None:
        loaded.add_adapter(adapter)
    return loaded


def check_generation_options(
    max_new_tokens: int, temperature: float, repetition_penalty: float = 1.0
) -> None:
    if not math.isfinite(temperature):
        raise AlignError(f"--temperature: must be a finite number (got {temperature})")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise AlignError(
            f"--repetition-penalty: must be a number > 0 (got {repetition_penalty}); 1 is none, "
            "1.1 to 1.5 discourage repeating what the answer already said"
        )
    if temperature < 0:
        raise AlignError(f"--temperature: must be >= 0 (got {temperature}); 0 is greedy")
    if max_new_tokens < 1:
        raise AlignError(f"--max-new-tokens: must be >= 1 (got {max_new_tokens})")


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Answer each prompt as a user turn of the chat template (as align scores it).

    Greedy (deterministic) at ``temperature`` 0; above it, sampled from a generator seeded with
    ``seed`` before each prompt, so the same call gives the same answers. One prompt at a time,
    so no padding can change an answer. ``repetition_penalty`` above 1 makes tokens the answer
    (or the prompt) already holds less likely (transformers' CTRL-style penalty).
    """
    import torch

    check_generation_options(max_new_tokens, temperature, repetition_penalty)
    language_model = loaded.language_model()
    device = next(loaded.model.parameters()).device
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = float(repetition_penalty)
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([language_model.prompt_ids(prompt)], dtype=torch.long, device=device)
            torch.manual_seed(seed)
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=loaded.tokenizer.pad_token_id,
                **options,
            )
            answers.append(loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers
