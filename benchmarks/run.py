"""align's benchmark suite: the same work done align's way and the alternatives' ways, in one run.

    python benchmarks/run.py            # full: 8 DPO steps per variant, the whole demo
    python benchmarks/run.py --quick    # a few minutes on 2 CPU cores (CI-sized)

Sections (each variant runs in its own subprocess so its peak memory is its own; the model,
data, steps and seed are the same for all):

* ``dpo``: DPO with the rank-1 adapter, each way timed from building its trainer (and, for the
  seed's design, copying the model) to the end of training, all in fp32 and from the same adapter
  initialisation: the seed's design (a frozen deep copy of the model as ``ref_model``), plain TRL
  with ``peft_config`` and ``ref_model=None``, the same with ``precompute_ref_log_probs=True``,
  TRL's fastest configuration (that, and ``gradient_checkpointing=False``), and align's ``dpo``
  objective. Without ``--quick`` also in bfloat16: TRL's fastest with its default ``bf16=True``
  (autocast) against align with ``model.dtype: bfloat16``. Pairs/s, tokens/s, peak RSS and the
  loss curve of each; align's ratios to each. (TRL's ``DPOConfig`` defaults to ``bf16=True``
  even on a CPU, where autocast to bfloat16 is fast on CPUs with AVX512-BF16: precision is set
  explicitly for every variant so that like is compared with like.)
* ``sft``: align's ``sft`` objective on the same topic's passages: time, tokens/s, MFU, beside a
  plain PyTorch loop of as many steps (the trainer's per-step overhead as a ratio).
* ``eval``: quiz and voice scoring as align does it (batched, each prompt run once for all its
  completions) against one plain forward pass per prompt and completion: wall time, speed-up,
  and whether the scores are identical.
* ``startup``: ``align --help`` wall time; time from ``align run`` to its first training step.
* ``demo`` (not with ``--quick``): the whole demo's wall time split by phase.

Writes ``$ALIGN_CACHE/benchmarks/latest.json`` (default ``~/.cache/align``; ``--out FILE`` to choose,
``--update`` for the committed ``benchmarks/results/latest.json`` that docs/performance.md quotes)
and prints a table. The DPO, SFT and evaluation rows report model FLOPs utilisation
(``benchmarks/flops.py``). Runs offline (``HF_HUB_OFFLINE=1``)
on the packaged SmolLM2 (converted once and cached by align).
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

from align.hf.source import cache_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]
DPO_VARIANTS = ("seed", "trl", "trl_precompute", "trl_fastest", "align")
#: Full runs only: align without its shared-prompt DPO forward (the lever's own measure), align
#: with gradient checkpointing (activation memory traded for recomputation), and bfloat16.
FULL_VARIANTS = ("align_unshared", "align_checkpointed", "trl_bf16", "align_bf16")
#: Where results go unless ``--out`` or ``--update`` says otherwise: outside the source tree, in
#: align's own cache (``$ALIGN_CACHE``, else the user cache directory).
DEFAULT_OUT = cache_root() / "benchmarks" / "latest.json"
#: The committed results that docs/performance.md quotes (``--update`` writes them).
COMMITTED = HERE / "results" / "latest.json"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX): without them bfloat16 is
    emulated, many times slower than fp32, and its rows would measure the emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has them; elsewhere, assume not
    return "avx512_bf16" in flags or "amx_bf16" in flags


# -- workers: run in a subprocess each -------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _topic() -> Any:
    from align.core.topics import load_topic_file

    return load_topic_file(REPO / "align" / "demo" / "topics" / "01_early_life.yaml")


def _dataset(topic: Any, tokenizer: Any) -> Any:
    from align.objectives.dpo import preference_dataset

    return preference_dataset(topic, chat=bool(tokenizer.chat_template))


def worker_dpo(variant: str, steps: int, batch: int) -> dict[str, Any]:
    """One DPO variant: train ``steps`` optimizer steps of ``batch`` pairs; time the training."""
    os.environ.update(ENV)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from align.core.runner import quiet_libraries
    from align.hf.source import resolve_model_path

    quiet_libraries()
    set_seed(0)
    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if variant == "align_bf16" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    topic = _topic()
    lora = LoraConfig(r=1, lora_alpha=1.0, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    scratch = tempfile.mkdtemp(prefix="align-bench-")
    logs: list[dict[str, float]] = []

    common = {
        "beta": 0.1,
        "learning_rate": 5e-3,
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "max_length": 256,
        "output_dir": scratch,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": variant == "trl_bf16",
        "fp16": False,
    }
    if variant in ("trl_fastest", "trl_bf16"):
        common["gradient_checkpointing"] = False
    dataset = _dataset(topic, tokenizer)
    if variant.startswith("align"):
        from align.hf.loading import attach_adapter
        from align.hf.policy import EnginePolicy
        from align.objectives.dpo import DPOObjective

        set_seed(0)  # every variant's adapter starts from the same random A (B is zero)
        checkpointed = variant == "align_checkpointed"
        model = attach_adapter(
            base, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS, gradient_checkpointing=checkpointed
        )
        policy = EnginePolicy(
            model, tokenizer, seed=0, scratch_dir=Path(scratch), gradient_checkpointing=checkpointed
        )
        policy.set_log_target(lambda step, entry: logs.append(entry) if "loss" in entry else None)
        objective = DPOObjective(
            max_steps=steps, per_device_train_batch_size=batch, share_prompt=variant != "align_unshared"
        )
        from flops import FlopMeter, utilisation

        meter = FlopMeter(model)
        with meter.watch():
            started = time.perf_counter()  # includes building the trainer, as for the others
            objective.train(policy, topic)
            seconds = time.perf_counter() - started
        mfu = utilisation(meter, seconds)
    else:
        mfu = None
        started = time.perf_counter()
        if variant == "seed":
            # The seed's design with today's TRL: a frozen full copy of the model, taken before
            # get_peft_model, as the reference.
            reference = copy.deepcopy(base).eval()
            set_seed(0)
            model = get_peft_model(base, lora)
            trainer = DPOTrainer(
                model=model,
                ref_model=reference,
                args=DPOConfig(**common),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        else:
            set_seed(0)  # the trainer wraps the model with the adapter first thing
            trainer = DPOTrainer(
                model=base,
                ref_model=None,
                peft_config=lora,
                args=DPOConfig(**common, precompute_ref_log_probs=variant != "trl"),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
        from align.hf.training import quiet_trainer

        quiet_trainer(trainer)
        trainer.train()
        seconds = time.perf_counter() - started
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = None
    token_counts = [entry.get("num_tokens") for entry in logs if entry.get("num_tokens") is not None]
    if token_counts:
        tokens = float(token_counts[-1])
    pairs = steps * batch
    return {
        "variant": variant,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "losses": [round(float(entry["loss"]), 4) for entry in logs],
        **({"mfu": mfu} if mfu else {}),
    }


def worker_sft(epochs: float) -> dict[str, Any]:
    """align's ``sft`` objective on the demo's early_life passages: time and MFU."""
    os.environ.update(ENV)
    from flops import FlopMeter, utilisation
    from transformers import set_seed

    from align.core.runner import quiet_libraries
    from align.hf.loading import attach_adapter, load_model
    from align.hf.policy import EnginePolicy
    from align.objectives.sft import SFTObjective

    quiet_libraries()
    set_seed(0)
    base, tokenizer = load_model("smollm2")
    model = attach_adapter(base, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS)
    policy = EnginePolicy(model, tokenizer, seed=0, scratch_dir=Path(tempfile.mkdtemp(prefix="align-bench-")))
    objective = SFTObjective(epochs=epochs)
    start = policy.snapshot()
    meter = FlopMeter(model)
    with meter.watch():
        started = time.perf_counter()
        metrics = objective.train(policy, _topic())
        seconds = time.perf_counter() - started
    steps = int(metrics["steps"])
    # The alternative: a plain PyTorch loop over the same texts, as many steps, batch 1, the
    # trainer's optimizer (AdamW), schedule (linear) and gradient clipping (1.0), from the same
    # adapter. What is left between the two is the trainer's per-step overhead.
    import torch

    policy.restore(start)
    texts = objective.texts(policy, _topic())
    texts = [texts[i % len(texts)] for i in range(steps)]
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=objective.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    model.train()
    started = time.perf_counter()
    plain_losses = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=objective.max_length)[
            "input_ids"
        ]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        plain_losses.append(float(loss))
    plain = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "steps": steps,
        "tokens_per_s": round(meter.decoder_tokens / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "mfu": utilisation(meter, seconds),
        "plain_loop_seconds": round(plain, 3),
        "trainer_over_plain_loop": round(seconds / plain, 2),
        "loss": round(float(metrics["loss"]), 4),
        "plain_loop_loss": round(sum(plain_losses) / len(plain_losses), 4),
    }


def worker_eval(topic_count: int | None = None) -> dict[str, Any]:
    """Quiz and voice scoring batched (align) against one prompt at a time, same model and scores,
    on the demo's topics (the first ``topic_count`` of them, for ``--quick``)."""
    os.environ.update(ENV)
    from align.core.runner import quiet_libraries
    from align.core.topics import load_topics
    from align.evaluators.quiz import QuizEvaluator
    from align.evaluators.voice import VoiceEvaluator
    from align.hf.language_model import HFLanguageModel
    from align.hf.loading import load_model

    quiet_libraries()
    model, tokenizer = load_model("smollm2")
    topics = load_topics(REPO / "align" / "demo" / "topics")[:topic_count]
    batched = HFLanguageModel(model, tokenizer, batch_size=16)

    import torch

    class OneAtATime:
        """The plain way: one forward pass over prompt + completion per pair, same tokens."""

        def loglikelihood(self, prompts: list[str], completions: list[str]) -> list[float]:
            scores = []
            model.eval()
            with torch.inference_mode():
                for prompt, completion in zip(prompts, completions):
                    prompt_ids, completion_ids = (
                        batched.prompt_ids(prompt),
                        batched.completion_ids(completion),
                    )
                    ids = torch.tensor([prompt_ids + completion_ids])
                    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
                    scores.append(float(logprobs[positions, torch.tensor(completion_ids)].sum()))
            return scores

    evaluators = [QuizEvaluator(), VoiceEvaluator()]

    def score(lm: Any) -> tuple[float, list[dict[str, float]]]:
        started = time.perf_counter()
        scores = [e.evaluate(lm, t) for t in topics for e in evaluators]
        return time.perf_counter() - started, scores

    from flops import FlopMeter, utilisation

    score(batched)  # warm-up: first-call costs (kernels, caches) are not what is compared
    meter = FlopMeter(model)
    with meter.watch():
        fast, fast_scores = score(batched)
    slow, slow_scores = score(OneAtATime())
    identical = all(
        abs(a[k] - b[k]) < 1e-4 if k.endswith("margin") else a[k] == b[k]
        for a, b in zip(fast_scores, slow_scores)
        for k in a
    )
    return {
        "batched_s": round(fast, 3),
        "one_at_a_time_s": round(slow, 3),
        "speedup": round(slow / fast, 2),
        "topics": len(topics),
        "identical_scores": identical,
        "scores": fast_scores,
        "mfu": utilisation(meter, fast),
    }


# -- the driver --------------------------------------------------------------------------------------
def _in_subprocess(*args: str, timeout: int = 1800) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__)), "--worker", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_startup() -> dict[str, Any]:
    align = str(Path(sys.executable).with_name("align"))
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([align, "--help"], capture_output=True, check=True, env=ENV)
        times.append(time.perf_counter() - started)
    first_step = _time_to_first_step(align)
    return {"help_s": round(min(times), 3), "first_training_step_s": first_step}


def _time_to_first_step(align: str) -> float | None:
    """Seconds from starting ``align run`` (model cached) to its first logged training step."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        started = time.perf_counter()
        process = subprocess.Popen(
            [align, "run", "--quiet", "--output", str(out), "--set", "protocol=[{train: sft}]"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while process.poll() is None and time.perf_counter() - started < 600:
                events = out / "metrics.jsonl"
                if events.exists() and '"kind": "log"' in events.read_text():
                    return round(time.perf_counter() - started, 2)
                time.sleep(0.05)
        finally:
            process.kill()
            process.wait()
    return None


def bench_demo() -> dict[str, Any]:
    align = str(Path(sys.executable).with_name("align"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        started = time.perf_counter()
        subprocess.run([align, "run", "--quiet", "--output", str(out)], check=True, env=ENV)
        total = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
    phases = {"sft": 0.0, "evaluation": 0.0, "dpo": 0.0, "recheck of earlier topics": 0.0}
    for topic in summary["topics"]:
        phases["recheck of earlier topics"] += topic.get("recheck_seconds", 0.0)
        for step in topic["steps"]:
            if step["status"] != "ran":
                continue
            key = (
                "evaluation" if step["kind"] == "eval" else step["step"] if step["step"] in phases else "dpo"
            )
            phases[key] += step["seconds"]
    run_seconds = summary["seconds"]
    phases["saving and bookkeeping"] = run_seconds - sum(phases.values())
    phases["start-up and model load"] = total - run_seconds
    # What the demo showed, so that a speed-up can be checked not to have changed its results.
    shown = {
        topic["topic"]: {
            step["step"]: step.get("metrics", {}) for step in topic["steps"] if step["status"] == "ran"
        }
        for topic in summary["topics"]
    }
    return {
        "total_s": round(total, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "results": shown,
    }


def environment() -> dict[str, Any]:
    import torch

    from align.core.runner import library_versions

    return {
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "platform": platform.platform(),
        "versions": library_versions(),
    }


def _mfu(m: dict[str, Any]) -> str:
    return (
        f"MFU {m['mfu']:.0%} ({m['achieved_gflops']} GFLOP/s useful of {m['gemm_gflops']} GFLOP/s torch.mm "
        f"at {m['tokens_per_call']} tokens)"
    )


def table(results: dict[str, Any]) -> str:
    lines = []
    dpo = results.get("dpo")
    if dpo:
        lines.append(
            f"DPO, {dpo['steps']} steps x {dpo['batch']} pairs (rank-1 LoRA, SmolLM2-135M; fp32 unless *_bf16)"
        )
        lines.append(f"{'variant':<16}{'pairs/s':>9}{'tokens/s':>10}{'peak MB':>9}  first → last loss")
        for row in dpo["variants"].values():
            tokens = f"{row['tokens_per_s']:>10.1f}" if row["tokens_per_s"] else f"{'-':>10}"
            losses = f"{row['losses'][0]:.3f} → {row['losses'][-1]:.3f}" if row["losses"] else "-"
            lines.append(
                f"{row['variant']:<16}{row['pairs_per_s']:>9.2f}{tokens}{row['peak_rss_mb']:>9.0f}  {losses}"
            )
        for name, value in dpo["ratios"].items():
            lines.append(f"  {name}: {value}")
        for row in dpo["variants"].values():
            if row.get("mfu"):
                lines.append(f"  {row['variant']} {_mfu(row['mfu'])}")
    if "sft" in results:
        t = results["sft"]
        lines.append(
            f"SFT ({t['steps']} steps): {t['seconds']}s, {t['tokens_per_s']} tokens/s, {_mfu(t['mfu'])}; "
            f"a plain loop of as many steps {t['plain_loop_seconds']}s (trainer / plain loop "
            f"{t['trainer_over_plain_loop']}x, mean loss {t['loss']} against {t['plain_loop_loss']})"
        )
    if "eval" in results:
        e = results["eval"]
        lines.append(
            f"Evaluation (quiz + voice, {e['topics']} topic(s)): batched {e['batched_s']}s, one at a time {e['one_at_a_time_s']}s, "
            f"speed-up {e['speedup']}x, identical scores: {e['identical_scores']}; batched {_mfu(e['mfu'])}"
        )
    if "startup" in results:
        s = results["startup"]
        lines.append(
            f"align --help {s['help_s']}s; align run to first training step {s['first_training_step_s']}s"
        )
    if "demo" in results:
        d = results["demo"]
        phases = ", ".join(f"{k} {v}s" for k, v in d["phases_s"].items())
        lines.append(f"Demo {d['total_s']}s: {phases}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    parser.add_argument("--only", choices=["dpo", "sft", "eval", "startup", "demo"], action="append")
    parser.add_argument("--out", type=Path, help=f"where to write the results (default {DEFAULT_OUT})")
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"write the committed results, {COMMITTED.relative_to(REPO)}, that docs/performance.md quotes",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "eval":
            result = worker_eval(int(rest[0]) if rest else None)
        elif kind == "sft":
            result = worker_sft(float(rest[0]))
        else:
            result = worker_dpo(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    if args.out is not None and args.update:
        parser.error("--out and --update name two places; give one")
    out = COMMITTED if args.update else args.out or DEFAULT_OUT
    sections = args.only or (["dpo", "sft", "eval", "startup"] + ([] if args.quick else ["demo"]))
    steps, batch = (2, 2) if args.quick else (8, 2)
    results: dict[str, Any] = {"quick": args.quick, **environment()}
    if "dpo" in sections:
        full = (
            FULL_VARIANTS
            if cpu_has_bfloat16()
            else tuple(v for v in FULL_VARIANTS if not v.endswith("_bf16"))
        )
        names = DPO_VARIANTS + (() if args.quick else full)
        variants = {v: _in_subprocess("dpo", v, str(steps), str(batch)) for v in names}
        ours = variants["align"]
        ratios = {
            f"align / {v} pairs/s": round(ours["pairs_per_s"] / variants[v]["pairs_per_s"], 2)
            for v in DPO_VARIANTS
            if v != "align"
        }
        ratios["align / seed peak memory"] = round(ours["peak_rss_mb"] / variants["seed"]["peak_rss_mb"], 2)
        ratios["align / trl_fastest peak memory"] = round(
            ours["peak_rss_mb"] / variants["trl_fastest"]["peak_rss_mb"], 2
        )
        if "align_unshared" in variants:
            ratios["align / align_unshared pairs/s"] = round(
                ours["pairs_per_s"] / variants["align_unshared"]["pairs_per_s"], 2
            )
        if "align_checkpointed" in variants:
            checkpointed = variants["align_checkpointed"]
            ratios["align_checkpointed / seed pairs/s"] = round(
                checkpointed["pairs_per_s"] / variants["seed"]["pairs_per_s"], 2
            )
            ratios["align_checkpointed / seed peak memory"] = round(
                checkpointed["peak_rss_mb"] / variants["seed"]["peak_rss_mb"], 2
            )
        if "align_bf16" in variants:
            ratios["align_bf16 / trl_bf16 pairs/s"] = round(
                variants["align_bf16"]["pairs_per_s"] / variants["trl_bf16"]["pairs_per_s"], 2
            )
            ratios["align_bf16 / align pairs/s"] = round(
                variants["align_bf16"]["pairs_per_s"] / ours["pairs_per_s"], 2
            )
        results["dpo"] = {"steps": steps, "batch": batch, "variants": variants, "ratios": ratios}
        if not args.quick and not cpu_has_bfloat16():
            results["dpo"]["skipped"] = "the bfloat16 rows: this CPU has no bfloat16 instructions"
    if "sft" in sections:
        results["sft"] = _in_subprocess("sft", "0.25" if args.quick else "3")
    if "eval" in sections:
        results["eval"] = _in_subprocess("eval", *(["1"] if args.quick else []))
    if "startup" in sections:
        results["startup"] = bench_startup()
    if "demo" in sections:
        results["demo"] = bench_demo()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(table(results))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
