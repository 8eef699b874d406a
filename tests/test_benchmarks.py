"""The benchmark suite runs (``--quick``) and reports every number it promises. No timing is asserted:
the numbers are measurements for docs/performance.md, not pass/fail criteria."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.benchmark


def run_benchmark(script, out, *args, timeout=600):
    """``benchmarks/<script>`` run with ``args`` and ``--out out``: its process, which must have
    succeeded, and the results it wrote."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, json.loads(out.read_text())


def test_quick_benchmark_suite_reports_every_section(tmp_path):
    completed, results = run_benchmark("run.py", tmp_path / "results.json", "--quick", timeout=1200)
    assert results["quick"] is True
    assert {"date", "machine", "versions"} <= results.keys()

    dpo = results["dpo"]
    assert set(dpo["variants"]) == {"seed", "trl", "trl_precompute", "trl_fastest", "align"}
    for row in dpo["variants"].values():
        assert row["pairs_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert len(row["losses"]) == dpo["steps"]
    # Every variant trains the same adapter from the same initialisation on the same batches with
    # the base model as reference, in fp32: the same loss curve, starting at ln 2.
    assert abs(dpo["variants"]["align"]["losses"][0] - 0.6931) < 1e-3
    for name, row in dpo["variants"].items():
        gaps = [abs(a - b) for a, b in zip(row["losses"], dpo["variants"]["align"]["losses"])]
        assert max(gaps) < 2e-3, (name, row["losses"], dpo["variants"]["align"]["losses"])
    assert set(dpo["ratios"]) == {
        "align / seed pairs/s",
        "align / trl pairs/s",
        "align / trl_precompute pairs/s",
        "align / trl_fastest pairs/s",
        "align / seed peak memory",
        "align / trl_fastest peak memory",
    }

    assert results["eval"]["identical_scores"] is True
    assert results["eval"]["speedup"] > 0
    # Model FLOPs utilisation of align's DPO, SFT and evaluation, against torch.mm in the same run.
    for mfu in (dpo["variants"]["align"]["mfu"], results["sft"]["mfu"], results["eval"]["mfu"]):
        assert mfu["useful_gflop"] > 0 and mfu["gemm_gflops"] > 0
        assert 0 < mfu["mfu"] == pytest.approx(mfu["achieved_gflops"] / mfu["gemm_gflops"], abs=0.01)
    assert results["sft"]["steps"] > 0
    assert results["sft"]["plain_loop_seconds"] > 0 and results["sft"]["trainer_over_plain_loop"] > 0
    assert results["startup"]["help_s"] > 0
    assert "speed-up" in completed.stdout and "pairs/s" in completed.stdout and "MFU" in completed.stdout


def test_scale_benchmark_runs_both_variants_from_the_same_start(tmp_path):
    """``benchmarks/scale.py`` (the GPU DPO benchmark) on its tiny shape on the CPU, so that a GPU
    session can trust it: both variants train, report their numbers and the ratios, and start
    from the same adapter with the base model as reference (the same first loss, ln 2)."""
    completed, results = run_benchmark(
        "scale.py", tmp_path / "scale.json", "--shape", "tiny", "--steps", "2", "--length", "32"
    )
    assert {"date", "device", "versions", "cuda"} <= results.keys()
    assert set(results["variants"]) == {"seed", "align"}
    for row in results["variants"].values():
        assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert len(row["losses"]) == 2 and abs(row["losses"][0] - 0.6931) < 1e-3
    seed, ours = results["variants"]["seed"], results["variants"]["align"]
    assert ours["tokens"] == seed["tokens"]  # the same pairs, truncated the same way
    assert max(abs(a - b) for a, b in zip(ours["losses"], seed["losses"])) < 2e-3
    assert set(results["ratios"]) == {"align / seed tokens/s", "align / seed peak memory"}
    assert "align / seed tokens/s" in completed.stdout


def test_replay_benchmark_times_both_schedules_against_the_sft_step(tmp_path, tiny_model_dir):
    """``benchmarks/replay.py`` on the tiny model: ``spaced`` picks without the model, ``weakest``
    scores the earlier items, and the SFT slice is scaled to the step's 6 epochs."""
    completed, results = run_benchmark(
        "replay.py",
        tmp_path / "replay.json",
        "--model",
        str(tiny_model_dir),
        "--epochs",
        "0.05",
        "--repeats",
        "1",
    )
    assert results["earlier_items"] == {"content": 35, "preference_pairs": 50}
    assert results["pick_seconds"]["weakest"] > results["pick_seconds"]["spaced"] >= 0
    assert results["sft_slice"]["steps"] >= 1
    # both rounded as written: the slice to 0.01 s, the scaled step to 0.1 s
    scaled = results["sft_slice"]["seconds"] * 6 / 0.05
    assert results["sft_6_epochs_seconds"] == pytest.approx(scaled, abs=0.005 * 6 / 0.05 + 0.05)
    assert results["weakest_share_of_sft"] > 0
    assert "self-test" in completed.stdout


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("align_bench_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.benchmark
def test_results_go_outside_the_source_tree_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    run = _run_module()
    assert tmp_path / "cache" / "benchmarks" / "latest.json" == run.DEFAULT_OUT
    assert run.COMMITTED == REPO / "benchmarks" / "results" / "latest.json"
    both = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--update", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "--out and --update" in both.stderr
