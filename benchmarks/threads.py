"""Compute threads on a shared machine: one training job alone against two side by side.

    HF_HUB_OFFLINE=1 python benchmarks/threads.py              # about 5 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/threads.py --steps 8    # shorter

torch starts one compute thread per core, so two jobs on one machine ask for twice the cores
there are. Each scenario runs the same work in one or two worker processes, started together:
SFT steps of the packaged SmolLM2 with a rank-1 adapter (forward, backward, AdamW, batch 1, the
demo's early_life passages), timed from a barrier that every worker of the scenario reaches after
loading and two warm-up steps. Scenarios:

* ``alone``: one job, torch's own thread count; ``alone, 1 thread``: one job, ``threads=1``;
  ``alone, passive wait``: one job with ``OMP_WAIT_POLICY=PASSIVE`` (below);
* ``two, default threads``: two jobs at once, each with torch's own count (what two ``align run``
  do unless told otherwise); ``two, 1 thread each``: two at once, each ``threads=1``
  (``--set threads=1``); ``two, default threads, passive wait``: the first again with
  ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep instead of spinning).

Reports each scenario's seconds per step (the slowest worker) and the machine's throughput
(steps per second of all its workers together), with ratios to ``alone``. Writes
``$ALIGN_CACHE/benchmarks/threads.json`` (or ``--out FILE``); prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ENV, TARGETS, _topic, environment

from align.hf.source import cache_root

DEFAULT_OUT = cache_root() / "benchmarks" / "threads.json"

#: Each scenario: (name, workers, threads per worker or None for torch's own, extra environment).
SCENARIOS: list[tuple[str, int, int | None, dict[str, str]]] = [
    ("alone", 1, None, {}),
    ("alone, 1 thread", 1, 1, {}),
    ("alone, passive wait", 1, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("two, default threads", 2, None, {}),
    ("two, 1 thread each", 2, 1, {}),
    ("two, default threads, passive wait", 2, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
]


def worker(steps: int, threads: int | None) -> None:
    """Load, warm up, say ``ready``, wait for ``go`` on stdin, train ``steps`` steps, print JSON."""
    import torch
    from transformers import set_seed

    from align.core.runner import quiet_libraries
    from align.hf.loading import attach_adapter, load_model, set_threads

    quiet_libraries()
    used = set_threads("auto" if threads is None else threads)
    set_seed(0)
    base, tokenizer = load_model("smollm2")
    model = attach_adapter(base, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS)
    texts = list(_topic().content)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=5e-3, weight_decay=0.0)
    model.train()

    def step(i: int) -> None:
        ids = tokenizer(texts[i % len(texts)], return_tensors="pt")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for i in range(2):
        step(i)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - started
    print(json.dumps({"threads": used, "seconds": round(seconds, 3), "steps": steps}), flush=True)


def scenario(workers: int, threads: int | None, extra: dict[str, str], steps: int) -> dict[str, Any]:
    """Start ``workers`` workers, release them together, and collect their timings."""
    command = [sys.executable, __file__, "--worker", str(steps), str(threads or 0)]
    env = {**ENV, **extra}
    processes = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(workers)
    ]
    for process in processes:
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a worker failed before its first step (exit {process.wait()})")
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    slowest = max(r["seconds"] for r in results)
    return {
        "workers": results,
        "seconds_per_step": round(slowest / steps, 4),
        "steps_per_s": round(sum(r["steps"] / r["seconds"] for r in results), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="timed steps per worker (default 24)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})"
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        steps, threads = (int(x) for x in args.worker)
        worker(steps, threads or None)
        return
    results: dict[str, Any] = {**environment(), "steps": args.steps, "scenarios": {}}
    for name, workers, threads, extra in SCENARIOS:
        results["scenarios"][name] = scenario(workers, threads, extra, args.steps)
        print(f"  {name}: {results['scenarios'][name]}", file=sys.stderr, flush=True)
    alone = results["scenarios"]["alone"]
    for row in results["scenarios"].values():
        row["step_time_vs_alone"] = round(row["seconds_per_step"] / alone["seconds_per_step"], 2)
        row["throughput_vs_alone"] = round(row["steps_per_s"] / alone["steps_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['machine']}, {results['date']}, {args.steps} SFT steps per job")
    print(
        f"{'scenario':<36} {'threads':>7} {'s/step':>8} {'x alone':>8} {'steps/s (all)':>14} {'x alone':>8}"
    )
    for name, row in results["scenarios"].items():
        threads = "+".join(str(w["threads"]) for w in row["workers"])
        print(
            f"{name:<36} {threads:>7} {row['seconds_per_step']:>8.3f} {row['step_time_vs_alone']:>8.2f} "
            f"{row['steps_per_s']:>14.2f} {row['throughput_vs_alone']:>8.2f}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
