"""Model cards: the ``README.md`` of every adapter, merged model and export align writes.

A card is Hugging Face's model-card format, so a hub tool publishes the directory as it is: YAML
metadata between ``---`` lines (``base_model`` as the base's hub id, never a local path; the
base's license; ``library_name``; ``tags``), then what the model was trained on (topics, protocol
steps, settings) and the run's metrics for it as a table. Everything comes from what a run
records (its config and its topic results, as in ``summary.json``), so the engine writes the
adapter's card from memory and ``align merge`` / ``align export`` write theirs from the run
directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: ``model.path`` values that are not hub ids but stand for one.
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: Licenses of the bases align knows; any other base's card leaves ``license`` out rather than guess.
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
#: What a card is for: the PEFT adapter directory, a merged safetensors model, a GGUF export.
KINDS = ("adapter", "merged", "gguf", "gguf-lora")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(path: str | None) -> str | None:
    """The hub id of ``model.path``: the packaged default's, a hub id as given, else ``None`` (a
    local directory has no id that another machine could resolve)."""
    if not isinstance(path, str):
        return None
    if path in HUB_IDS:
        return HUB_IDS[path]
    if _HUB_ID.match(path) and not Path(path).expanduser().exists():
        return path
    return None


def _metadata(kind: str, base: str | None, topics: Sequence[str]) -> dict[str, Any]:
    tags = ["align", "lora", "rank-1", "text-generation"]
    data: dict[str, Any] = {}
    if base is not None:
        data["base_model"] = base
        # The hub's model tree: an adapter of the base; merged and exported models are fine-tunes.
        data["base_model_relation"] = "adapter" if kind in ("adapter", "gguf-lora") else "finetune"
    if base in LICENSES:
        data["license"] = LICENSES[base]
    if kind == "adapter":
        data["library_name"] = "peft"
        tags += ["peft", *([f"base_model:adapter:{base}"] if base else [])]
    elif kind == "merged":
        data["library_name"] = "transformers"
        tags += ["transformers", "safetensors", "merged"]
    else:
        tags += ["gguf", "llama.cpp"] + (["ollama"] if kind == "gguf" else [])
    data["pipeline_tag"] = "text-generation"
    data["tags"] = tags
    data["align_topics"] = list(topics)
    return data


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _settings(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` rows of the settings that shaped the adapter."""
    rows: list[tuple[str, Any]] = [("seed", config.get("seed"))]
    for section in ("lora", "replay"):
        values = config.get(section)
        if isinstance(values, Mapping):
            rows += [(f"{section}.{key}", value) for key, value in values.items()]
    for step in config.get("protocol") or []:
        objective = step.get("train") if isinstance(step, Mapping) else None
        values = config.get(objective) if isinstance(objective, str) else None
        if isinstance(values, Mapping):
            rows += [(f"{objective}.{key}", value) for key, value in values.items() if value is not None]
    return [(key, value) for key, value in rows if value is not None]


def model_card(
    kind: str,
    *,
    config: Mapping[str, Any] | None,
    results: Sequence[Mapping[str, Any]],
    name: str | None = None,
    details: Sequence[tuple[str, Any]] = (),
) -> str:
    """The ``README.md`` of an adapter (or a model made from it) trained on ``results``' topics.

    ``results`` are the run's topic results up to and including the adapter's topic (entries as
    in ``summary.json``: ``topic``, ``steps`` with their ``metrics``, ``recheck``); the last is
    the adapter's own topic. ``config`` is the run's (``None`` when the adapter is not in a run).
    ``details`` are extra ``(key, value)`` rows for the "Files" table (an export's format).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model card kind {kind!r}")
    config = config or {}
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    base = base_model_id(model.get("path"))
    topics = [str(result.get("topic")) for result in results]
    front = yaml.safe_dump(_metadata(kind, base, topics), sort_keys=False, allow_unicode=True)
    what = {
        "adapter": "A rank-1 LoRA adapter",
        "merged": "A model with align's rank-1 LoRA adapter merged into its weights",
        "gguf": "A GGUF model (llama.cpp, Ollama, LM Studio) with align's rank-1 LoRA adapter merged in",
        "gguf-lora": "A rank-1 LoRA adapter in llama.cpp's GGUF adapter format",
    }[kind]
    on = f"[{base}](https://huggingface.co/{base})" if base else "a local base model"
    title = name or (f"align: {topics[-1]}" if topics else "align model")
    lines = [
        "---",
        front.rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"{what} on {on}, trained by align (`pip install mindprint-align`) to hold one "
        "person's knowledge and voice, topic by topic.",
        "",
        "## Training",
        "",
    ]
    if topics:
        lines.append(f"Topics, in the order trained: {', '.join(f'`{t}`' for t in topics)}.")
        lines.append("")
    steps = [
        (str(r.get("topic")), str(s.get("step")), str(s.get("kind")), str(s.get("status")))
        for r in results
        for s in r.get("steps") or []
    ]
    if steps:
        lines += ["| topic | step | kind | status |", "|---|---|---|---|"]
        lines += [f"| {_cell(t)} | {_cell(s)} | {_cell(k)} | {_cell(st)} |" for t, s, k, st in steps]
        lines.append("")
    settings = _settings(config)
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| `{_cell(key)}` | {_cell(_value(value))} |" for key, value in settings]
        lines.append("")
    lines += ["## Metrics", ""]
    rows = _metric_rows(results[-1]) if results else []
    if rows:
        lines.append(
            f"Measured by the run on topic `{topics[-1]}` (each step in order) and, after it, on the "
            "earlier topics again (`recheck`: what the adapter kept of them)."
        )
        lines += ["", "| topic | step | metric | value |", "|---|---|---|---:|"]
        lines += [f"| {_cell(t)} | {_cell(s)} | `{_cell(m)}` | {_value(v)} |" for t, s, m, v in rows]
    else:
        lines.append("The run recorded no metrics for this adapter.")
    lines.append("")
    if details:
        lines += ["## Files", "", "| | |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(_value(value))} |" for key, value in details]
        lines.append("")
    lines += ["## Use", "", *_usage(kind, base), ""]
    return "\n".join(lines)


def _metric_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, float]]:
    topic = str(result.get("topic"))
    rows = []
    for step in result.get("steps") or []:
        if step.get("status") != "ran":
            continue
        for metric, value in (step.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((topic, str(step.get("step")), str(metric), float(value)))
    for earlier, metrics in (result.get("recheck") or {}).items():
        for metric, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((str(earlier), "recheck", str(metric), float(value)))
    return rows


def _usage(kind: str, base: str | None) -> list[str]:
    if kind == "adapter":
        return [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")',
            'model = PeftModel.from_pretrained(base, "THIS_DIRECTORY")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base or "BASE_MODEL"}")',
            "```",
            "",
            "or `align chat --adapter THIS_DIRECTORY`.",
        ]
    if kind == "merged":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
            "```",
        ]
    if kind == "gguf":
        return [
            "```sh",
            "ollama create my-model -f Modelfile && ollama run my-model",
            "llama-cli -m model.gguf -cnv",
            "```",
        ]
    return [
        "```sh",
        f"llama-cli -m {base.split('/')[-1] if base else 'BASE'}.gguf --lora adapter.gguf -cnv",
        "```",
    ]


def run_card(kind: str, adapter: Path, *, details: Sequence[tuple[str, Any]] = ()) -> str:
    """The card of a model made from ``adapter``, from what its run recorded (when it is in one)."""
    from align.tools.runs import read_run_config, read_summary, run_of_adapter

    run = run_of_adapter(adapter)
    config: dict[str, Any] | None = None
    results: list[Mapping[str, Any]] = []
    if run is not None:
        config = read_run_config(run)
        if (run / "summary.json").is_file():
            for entry in read_summary(run)["topics"]:
                results.append(entry)
                if entry.get("topic") == adapter.name:
                    break
            else:
                results = []
    if not results:
        results = [{"topic": adapter.name, "steps": []}]
    if config is None:
        config = {"lora": _lora_of(adapter)}
    return model_card(kind, config=config, results=results, details=details)


def _lora_of(adapter: Path) -> dict[str, Any]:
    """The LoRA settings in a PEFT ``adapter_config.json`` (an adapter outside a run)."""
    try:
        data = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
    return {name: data[key] for key, name in keys.items() if key in data}


def front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card (what a hub reads), as data."""
    if not text.startswith("---\n"):
        raise ValueError("a model card starts with a '---' line")
    end = text.index("\n---\n", 4)
    data = yaml.safe_load(text[4:end])
    if not isinstance(data, dict):
        raise ValueError("a model card's metadata is a mapping")
    return data
