"""The benchmark suite runs (``--quick``) and reports every number it promises. No timing is asserted:
the numbers are measurements for docs/performance.md, not pass/fail criteria."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_quick_benchmark_suite_reports_every_section(tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert {"date", "machine", "versions"} <= results.keys()

    dpo = results["dpo"]
    assert set(dpo["variants"]) == {"seed", "trl", "trl_precompute", "align"}
    for row in dpo["variants"].values():
        assert row["pairs_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert len(row["losses"]) == dpo["steps"]
    # Every variant trains the same adapter from the same start with the base model as reference,
    # so all four see the same first loss (ln 2 for sigmoid DPO).
    first = {name: row["losses"][0] for name, row in dpo["variants"].items()}
    assert max(first.values()) - min(first.values()) < 1e-3, first
    assert set(dpo["ratios"]) == {
        "align / seed pairs/s",
        "align / trl pairs/s",
        "align / trl_precompute pairs/s",
        "align / seed peak memory",
    }

    assert results["eval"]["identical_scores"] is True
    assert results["eval"]["speedup"] > 0
    assert results["startup"]["help_s"] > 0
    assert "speed-up" in completed.stdout and "pairs/s" in completed.stdout
