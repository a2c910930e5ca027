"""The benchmark scripts run end to end in their quick mode (their figures come from full runs)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import requires_mnist

ROOT = Path(__file__).resolve().parents[1]


@requires_mnist
def test_em_benchmark_quick(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "em.py"), "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads((tmp_path / "em-quick.json").read_text())
    rows = report["gmm"]["rows"]
    assert {"scikit-learn (float64)", "zoo EM (float64)"} <= set(rows)
    # same start, same algorithm: the final log-likelihoods agree
    assert rows["zoo EM (float64)"]["ll_rel_diff_vs_sklearn"] < 1e-6
    assert [r["K"] for r in report["bmm"]["runs"]] == [10, 20]
    assert (tmp_path / "em-quick.md").read_text().startswith("# EM benchmark")
