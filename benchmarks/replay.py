"""What ``replay.schedule: weakest`` adds to a run: its self-test of the earlier items, against the
SFT step it chooses replay for, on the last topic of a six-topic set.

    HF_HUB_OFFLINE=1 python benchmarks/replay.py                     # about 2 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/replay.py --topics examples/topics-check

``weakest`` scores every earlier passage (its facts blanked and answered) and preference pair (its
prompt answered with the person's answer) with the adapter as each training step starts; ``spaced``
computes its picks from the topics alone. Times, on the packaged SmolLM2 with a rank-1 adapter:

* each schedule's pick for the last topic's SFT step (passages and pairs), best of ``--repeats``;
* a slice of that SFT step (``--epochs``, default a quarter of one epoch, on the topic with the
  ``weakest`` replay mixed in), scaled to the 6 epochs ``configs/mindprint.yaml`` trains.

Prints the seconds and the self-test's share of the step; writes ``--out FILE`` as JSON if given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ENV, TARGETS, environment

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", default=str(REPO / "examples" / "topics"))
    parser.add_argument("--model", default="smollm2", help="a model name or directory (tests: a tiny one)")
    parser.add_argument("--epochs", type=float, default=0.25, help="the slice of SFT timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.update(ENV)

    from transformers import set_seed

    from align.core.replay import replay_topic
    from align.core.runner import quiet_libraries
    from align.core.topics import load_topics
    from align.hf.loading import attach_adapter, load_model
    from align.hf.policy import EnginePolicy
    from align.objectives.sft import SFTObjective

    quiet_libraries()
    set_seed(0)
    base, tokenizer = load_model(args.model)
    model = attach_adapter(base, rank=1, alpha=1.0, dropout=0.0, target_modules=TARGETS)
    policy = EnginePolicy(model, tokenizer, seed=0, scratch_dir=Path(tempfile.mkdtemp(prefix="align-bench-")))
    topics = load_topics(args.topics)
    last, earlier = topics[-1], topics[:-1]
    settings = {"content": 1.0, "preference_pairs": 1.0}

    picks: dict[str, float] = {}
    mixed = last
    for schedule in ("spaced", "weakest"):
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            mixed, _ = replay_topic(last, earlier, settings, 0, "sft", schedule, policy.language_model)
            best = min(best, time.perf_counter() - started)
        picks[schedule] = best

    objective = SFTObjective(epochs=args.epochs, answers="chosen")
    started = time.perf_counter()
    steps = int(objective.train(policy, mixed)["steps"])
    slice_seconds = time.perf_counter() - started
    full = slice_seconds * 6 / args.epochs
    result = {
        "environment": environment(),
        "topics": args.topics,
        "earlier_items": {
            "content": sum(len(t.content) for t in earlier),
            "preference_pairs": sum(len(t.preference_pairs) for t in earlier),
        },
        "pick_seconds": {k: round(v, 3) for k, v in picks.items()},
        "sft_slice": {"epochs": args.epochs, "steps": steps, "seconds": round(slice_seconds, 2)},
        "sft_6_epochs_seconds": round(full, 1),
        "weakest_share_of_sft": round((picks["weakest"] - picks["spaced"]) / full, 4),
    }
    print(f"earlier items scored: {result['earlier_items']}")
    print(f"pick, spaced:  {picks['spaced']:.3f} s")
    print(f"pick, weakest: {picks['weakest']:.3f} s (the self-test)")
    print(f"SFT: {steps} steps in {slice_seconds:.1f} s ({args.epochs:g} epochs), so {full:.0f} s for 6")
    print(f"weakest's self-test: {100 * result['weakest_share_of_sft']:.2f} % of the step it picks for")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
