"""DPO on a Llama-shaped model: align's ``dpo`` objective against the seed's design, in one run.

    python benchmarks/scale.py                        # Llama-3.2-1B's shape, bf16, on the GPU
    python benchmarks/scale.py --shape tiny --steps 2 # a CPU check that the script runs (CI)

The model is built from a config (random weights, seeded: no download), so what is measured is
the cost of the shapes: tokens/s and peak memory of a multi-step DPO with the rank-1 adapter on
the seed's target modules. Two variants, each in its own subprocess so that its peak memory is its
own, on the same pairs, steps, batch and adapter initialisation:

* ``seed``: the seed's design with today's TRL: a frozen deep copy of the model as ``ref_model``.
* ``align``: align's ``dpo`` objective (its reference is a copy of the rank-1 adapter, with the
  reference log-probs computed once before the first step).

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the peak RSS on a CPU. The pairs
are the demo's preference pairs with their answers repeated up to ``--length`` tokens. The
tokenizer is the packaged SmolLM2's (49,152 words) unless ``--tokenizer DIR`` names another; the
vocabulary of the model is Llama's (128,256), so the LM head costs what Llama's does.

Writes ``benchmarks/results/scale-<device>.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]
VARIANTS = ("seed", "align")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}

#: Llama-3.2-1B's published shape (1.24e9 parameters, tied embeddings), and a tiny one for CPUs.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}


def _pairs(tokenizer: Any, length: int) -> Any:
    """The demo topic with each preference answer repeated to about ``length`` tokens."""
    from dataclasses import replace

    from align.core.topics import load_topic_file

    topic = load_topic_file(REPO / "align" / "demo" / "topics" / "01_early_life.yaml")
    pairs = []
    for pair in topic.preference_pairs:
        longer = {}
        for side in ("chosen", "rejected"):
            text = getattr(pair, side)
            count = max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
            longer[side] = " ".join([text] * max(1, length // count))
        pairs.append(replace(pair, **longer))
    return replace(topic, preference_pairs=pairs)


def worker(
    variant: str, shape: str, steps: int, batch: int, length: int, tokenizer_dir: str
) -> dict[str, Any]:
    os.environ.update(ENV)
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed
    from trl import DPOConfig, DPOTrainer

    from align.core.runner import quiet_libraries
    from align.hf.loading import attach_adapter
    from align.hf.policy import EnginePolicy
    from align.hf.training import quiet_trainer
    from align.objectives.dpo import DPOObjective, preference_dataset

    quiet_libraries()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 autocast-free weights on a GPU
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(**SHAPES[shape], pad_token_id=tokenizer.pad_token_id)
    set_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.to("cuda" if cuda else "cpu")
    parameters = sum(p.numel() for p in model.parameters())
    topic = _pairs(tokenizer, length)
    scratch = tempfile.mkdtemp(prefix="align-scale-")
    max_length = 2 * length + 64
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    set_seed(0)  # both variants' adapters start from the same random A (B is zero)
    started = time.perf_counter()
    if variant == "align":
        policy = EnginePolicy(
            attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS),
            tokenizer,
            seed=0,
            scratch_dir=Path(scratch),
        )
        logs: list[dict[str, float]] = []
        policy.set_log_target(lambda step, entry: logs.append(entry) if "loss" in entry else None)
        objective = DPOObjective(
            max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-3, max_length=max_length
        )
        objective.train(policy, topic)
    else:
        from peft import LoraConfig

        reference = copy.deepcopy(model).eval()
        lora = LoraConfig(
            r=1, lora_alpha=1.0, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
        )
        trainer = DPOTrainer(
            model=get_peft_model(model, lora),
            ref_model=reference,
            args=DPOConfig(
                output_dir=scratch,
                beta=0.1,
                learning_rate=5e-3,
                max_steps=steps,
                per_device_train_batch_size=batch,
                max_length=max_length,
                report_to="none",
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                seed=0,
                use_cpu=not cuda,
                bf16=False,  # the weights are bf16 already; no autocast, like align
                fp16=False,
                gradient_checkpointing=False,
            ),
            train_dataset=preference_dataset(topic, chat=bool(tokenizer.chat_template)),
            processing_class=tokenizer,
        )
        quiet_trainer(trainer).train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    seconds = time.perf_counter() - started
    tokens = float(logs[-1]["num_tokens"]) if logs and "num_tokens" in logs[-1] else None
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    )
    return {
        "variant": variant,
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
        "peak_memory_mb": round(peak, 1),
        "losses": [round(float(entry["loss"]), 4) for entry in logs],
    }


def environment() -> dict[str, Any]:
    import torch

    from align.core.runner import library_versions

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": _dt.date.today().isoformat(),
        "device": device,
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "versions": library_versions(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--length", type=int, default=512, help="tokens per answer, about")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the packaged SmolLM2's)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, shape, steps, batch, length, tokenizer_dir = args.worker
        print(json.dumps(worker(variant, shape, int(steps), int(batch), int(length), tokenizer_dir)))
        return
    if args.tokenizer is None:
        from align.hf.source import resolve_model_path

        os.environ.update(ENV)
        args.tokenizer = str(resolve_model_path("smollm2"))
    runs = {}
    for variant in VARIANTS:
        worker_args = [
            variant,
            args.shape,
            str(args.steps),
            str(args.batch),
            str(args.length),
            args.tokenizer,
        ]
        done = subprocess.run(
            [sys.executable, str(Path(__file__)), "--worker", *worker_args],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=3600,
        )
        if done.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{done.stderr[-4000:]}")
        runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, seed = runs["align"], runs["seed"]
    results = {
        **environment(),
        "shape": args.shape,
        "steps": args.steps,
        "batch": args.batch,
        "length": args.length,
        "variants": runs,
        "ratios": {
            "align / seed tokens/s": round(ours["tokens_per_s"] / seed["tokens_per_s"], 2),
            "align / seed peak memory": round(ours["peak_memory_mb"] / seed["peak_memory_mb"], 2),
        },
    }
    out = args.out or HERE / "results" / f"scale-{'cuda' if results['cuda'] else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(
        f"{args.shape} ({ours['parameters'] / 1e9:.2f}e9 parameters, {ours['dtype']}) on {results['device']}"
    )
    print(f"DPO: {args.steps} steps x {args.batch} pairs, answers of about {args.length} tokens")
    print("variant   tokens/s   peak memory (MB)   first loss -> last loss")
    for name, row in runs.items():
        curve = f"{row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}" if row["losses"] else "-"
        print(f"{name:<9} {row['tokens_per_s']:>8}   {row['peak_memory_mb']:>16}   {curve}")
    for name, value in results["ratios"].items():
        print(f"{name}: {value}x")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
