"""The benchmark scripts run end to end in their quick mode (their figures come from full runs)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import requires_mnist

ROOT = Path(__file__).resolve().parents[1]


def _quick(script: str, out: Path) -> None:
    """Run benchmarks/SCRIPT in its quick mode, writing into ``out``."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)


@requires_mnist
def test_em_benchmark_quick(tmp_path):
    _quick("em.py", tmp_path)
    report = json.loads((tmp_path / "em-quick.json").read_text())
    rows = report["gmm"]["rows"]
    assert {"scikit-learn (float64)", "zoo EM (float64)"} <= set(rows)
    # same start, same algorithm: the final log-likelihoods agree
    assert rows["zoo EM (float64)"]["ll_rel_diff_vs_sklearn"] < 1e-6
    runs = report["bmm"]["runs"]
    assert [r["K"] for r in runs] == [10, 10, 20, 20]  # each K on dense data, then sparse rows
    assert [r["data"] == "dense" for r in runs] == [True, False, True, False]
    for run in runs:  # the ceilings beside the achieved rate are measured
        assert run["products_only_gflops"] > 0 and run["read_bandwidth_gb_s"] > 0
        if run["data"] == "dense":
            assert 0 < run["roofline_gflops"] <= run["matmul_gflops_adjacent"]
    for dense, sparse in (runs[:2], runs[2:]):  # the same fit, in another order of arithmetic
        assert sparse["iterations"] == dense["iterations"]
        assert abs(sparse["test_log_likelihood"] / dense["test_log_likelihood"] - 1) < 1e-6
    assert (tmp_path / "em-quick.md").read_text().startswith("# EM benchmark")


@requires_mnist
def test_vae_speed_benchmark_quick(tmp_path):
    _quick("vae_speed.py", tmp_path)
    report = json.loads((tmp_path / "vae_speed-quick.json").read_text())
    assert len(report["rows"]) == 12  # six drivers, validation off and on
    for row in report["rows"].values():  # driver and plain epochs come in timed pairs
        assert row["pairs"] and all(d > 0 and p > 0 for d, p in row["pairs"])
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]


def test_diffusion_benchmark_quick(tmp_path):
    _quick("diffusion_nll.py", tmp_path)
    rows = json.loads((tmp_path / "diffusion_depth-quick.json").read_text())
    assert [r["steps"] for r in rows] == [10, 100]
    # every bound is finite, below the 64 log 2 of uniform pixels after two epochs
    assert all(0 < r["test_neg_elbo"] < 64 * 0.6931 for r in rows)
    assert (tmp_path / "diffusion_depth-quick.png").exists()
