"""The benchmark scripts run end to end in their quick mode (their figures come from full runs)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_mnist

ROOT = Path(__file__).resolve().parents[1]


def _quick(script: str, out: Path, *options: str) -> None:
    """Run benchmarks/SCRIPT in its quick mode, writing into ``out``."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)]
    command += options
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
    text = (tmp_path / "em-quick.md").read_text()
    assert text.startswith("# EM benchmark") and "load average (1 min)" in text
    assert len(report["machine"]["load_average_1min"]) == 2


@requires_mnist
def test_vae_speed_benchmark_quick(tmp_path, monkeypatch):
    # a batch other than the default 128 (its files are named after it), which also makes the
    # quick mode's 2,048 images a whole number of steps
    before = os.getloadavg()[0]
    _quick("vae_speed.py", tmp_path, "--batch-size", "256")
    after = os.getloadavg()[0]
    report = json.loads((tmp_path / "vae_speed-quick-b256.json").read_text())
    assert report["batch_size"] == 256 and report["command"].endswith("--batch-size 256")
    assert len(report["rows"]) == 14  # seven drivers, validation off and on
    # the machine's state beside the figures: the load average at the start and at the end
    # read at the benchmark's start and end: the 1-minute average moves by at most a few
    # hundredths a second, so each is near this test's own reading just before or after
    start, end = report["load_average_1min"]
    assert abs(start - before) < 1.0 and abs(end - after) < 1.0, (before, start, end, after)
    text = (tmp_path / "vae_speed-quick-b256.md").read_text()
    assert "load average (1 min)" in text
    # the JSON holds everything the table says: the Markdown is made again from it alone
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import vae_speed

    assert vae_speed.markdown(report) == text
    if Path("/proc/stat").exists():  # Linux: the hypervisor's share of the CPUs' time
        assert 0 <= report["steal_fraction"] < 1
    assert {"plain", "compiled"} <= set(report["peers"])  # numpyro too where it is installed
    for row in report["rows"].values():  # driver and peer epochs come in timed pairs
        epochs = row["epochs"]
        assert set(epochs) == {"driver", *report["peers"]}
        assert len({len(t) for t in epochs.values()}) == 1  # one peer epoch per driver epoch
        assert all(t > 0 for times in epochs.values() for t in times)
        for peer in report["peers"]:
            low, high = row[f"ratio_{peer}_range"]
            assert low <= row[f"ratio_{peer}"] <= high
        # the roofline: the epoch's matrix products at the GEMM rate measured in the run
        assert row["roofline_fraction"] == pytest.approx(
            report["roofline_sec_per_epoch"] / row["sec_per_epoch"]
        )
    # the products alone can beat no loop and cannot beat the GEMM rate by much
    assert (
        0
        < report["products_sec_per_epoch"]
        <= min(row["sec_per_epoch"] for row in report["rows"].values())
    )
    # the roofline's rate is the run's best GEMM rate, or the products' own where they ran faster
    assert report["roofline_gflops"] == pytest.approx(
        max(report["matmul_gflops"], report["epoch_gflop"] / report["products_sec_per_epoch"])
    )
    assert report["products_sec_per_epoch"] >= report["roofline_sec_per_epoch"] * (1 - 1e-9)
    # 2 B (3 sum(in out) - 784 400) flops per step of B rows: 0.42 GFLOP at B = 128
    assert report["epoch_gflop"] == pytest.approx(
        2 * 3 * 651200 * 2048 / 1e9 - 2 * 784 * 400 * 2048 / 1e9
    )


def test_diffusion_benchmark_quick(tmp_path):
    _quick("diffusion_nll.py", tmp_path)
    rows = json.loads((tmp_path / "diffusion_depth-quick.json").read_text())
    assert [r["steps"] for r in rows] == [10, 100]
    # every bound is finite, below the 64 log 2 of uniform pixels after two epochs
    assert all(0 < r["test_neg_elbo"] < 64 * 0.6931 for r in rows)
    assert (tmp_path / "diffusion_depth-quick.png").exists()


def test_vqvae_benchmark_quick(tmp_path):
    _quick("vqvae_nll.py", tmp_path, "--runs", str(tmp_path / "runs"))
    learned, uniform, vae = json.loads((tmp_path / "vqvae_nll-quick.json").read_text())
    assert uniform["codes"] == pytest.approx(4 * math.log(64))  # four codes, K = 64
    assert learned["codes"] < uniform["codes"] - 1.0  # the fitted prior shortens them
    for row in (learned, uniform):
        assert row["bound"] == pytest.approx(row["reconstruction"] + row["codes"], abs=1e-3)
    assert 0 < vae["bound"] < 64 * math.log(2)
    assert (tmp_path / "vqvae_nll-quick-samples_learned.png").exists()


def test_applications_benchmark_quick(tmp_path):
    _quick("applications.py", tmp_path, "--runs", str(tmp_path / "runs"))
    rows = json.loads((tmp_path / "applications_completion-quick.json").read_text())
    mixture = [r for r in rows if r["model"] == "Bernoulli mixture"]
    assert len(mixture) == 9 and all(r["exact"] for r in mixture)
    for r in mixture:  # exact posteriors beat the baselines on every task
        ours, base = (
            ("completion", "mean") if "completion_log_loss" in r else ("denoised", "noisy_input")
        )
        assert r[f"{ours}_log_loss"] < r[f"{base}_log_loss"], r["task"]
    # the quadrant task, read from the mask file: one of four quadrants seen, for every model
    task = [r for r in rows if r["task"].startswith("complete one quadrant (task)")]
    assert len(task) == 5 and all(r["hidden_fraction"] == 0.75 for r in task if "mask" in r)
    cvae = next(r for r in task if r["model"].startswith("CVAE"))
    assert cvae["conditioned"] and not cvae["exact"] and cvae["proposal"] == "prior"
    # nothing of the CVAE's likelihood is seen (its pixels are the hidden ones): z from its
    # prior network, every weight equal
    assert cvae["median_ess"] == pytest.approx(cvae["num_samples"], rel=1e-6)
    auroc = json.loads((tmp_path / "applications_oneclass-quick.json").read_text())
    per_class = [r for r in auroc if r["digit"] != "all"]
    methods = {r["method"] for r in per_class}
    assert {"Bernoulli mixture", "Bernoulli mixture, complexity-corrected", "IsolationForest",
            "OneClassSVM (RBF)"} <= methods  # fmt: skip
    assert len(per_class) == 10 * len(methods)
    bmm = [r["auroc"] for r in per_class if r["method"] == "Bernoulli mixture"]
    assert sum(bmm) / 10 > 0.9  # 0.955 when measured; chance is 0.5
    sanity = {r["method"]: r for r in auroc if r["digit"] == "all"}
    assert sanity["Bernoulli mixture"]["auroc"]["noise"] > 0.99  # random pixels: no digits


@requires_mnist
def test_load_benchmark_quick(tmp_path):
    _quick("load.py", tmp_path, "--load", "1", "--steps", "vae")
    report = json.loads((tmp_path / "load-quick.json").read_text())
    row = report["steps"]["vae"]
    cores = report["cores"]
    cases = ("auto/0", "auto/1", "spin/0", "spin/1", "1/0", "1/1", f"{cores}/0", f"{cores}/1")
    for case in cases:  # idle, loaded
        assert row[case] > 0
    # the spinning column asks libgomp to spin, so omp_wait leaves it so
    assert row["wait_policy"]["spin/1"] == ["left as set: GOMP_SPINCOUNT=300000"]
    assert all(len(row["wait_policy"][case]) == 1 for case in cases)
    assert row["ratio_spin"] == pytest.approx(row["spin/1"] / row["spin/0"])
    assert row["ratio_auto"] == pytest.approx(row["auto/1"] / row["auto/0"])
    assert row["ratio_one"] == pytest.approx(row["1/1"] / row["1/0"])
    assert row["ratio_pinned"] == pytest.approx(row[f"{cores}/1"] / row[f"{cores}/0"])
    table = (tmp_path / "load-quick.md").read_text()
    assert f"{row['1/1'] / row['1/0']:.2f}x" in table  # the one-thread column is reported
    assert "--load 1 --steps vae" in report["command"]


def test_nuts_speed_benchmark_quick(tmp_path):
    _quick("nuts_speed.py", tmp_path)
    report = json.loads((tmp_path / "nuts_speed-quick.json").read_text())
    samplers = report["samplers"]
    assert {"zoo", "Pyro jit"} <= set(samplers)  # NumPyro with the [peers] extra
    base = samplers["Pyro jit"]["seconds_median"]
    for row in samplers.values():
        assert row["gradients_median"] > 0
        assert row["ratio_vs_pyro_jit"] == pytest.approx(row["seconds_median"] / base)
        # the same posterior: a wrong potential (other data, a lost term) moves the locations
        # by about a standard deviation of the data, 1 on this scale; 20 draws, posterior sd 0.03
        assert row["locs_max_diff_vs_pyro_jit"] < 0.25
    assert samplers["zoo"]["runs"][0]["how"].startswith("fused")
    compare = report["comparison"]
    assert compare["fits_total"] == pytest.approx(sum(compare["fit_seconds"]))
    assert 0 < compare["fits_total"] < compare["seconds"]  # the command does more than fit
    assert compare["potential"].startswith("fused")
    assert len(report["load_average_1min"]) == 2
    if Path("/proc/stat").exists():
        assert 0 <= report["steal_fraction"] < 1


def test_steal_is_read_from_the_eighth_field_of_the_cpu_line(tmp_path, monkeypatch):
    """The machine-state figure beside the speed tables: /proc/stat's first line is
    ``cpu user nice system idle iowait irq softirq steal guest guest_nice``."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _rates import cpu_ticks, steal_fraction

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 1 50 800 10 2 3 34 7 0\ncpu0 50 0 25 400 5 1 1 17 3 0\n")
    assert cpu_ticks(str(stat)) == (34, 1000)  # guest time is inside user time: not added
    assert cpu_ticks(str(tmp_path / "missing")) is None
    assert steal_fraction((34, 1000), (84, 1200)) == pytest.approx(0.25)
    assert math.isnan(steal_fraction(None, (84, 1200)))


def test_kill_resume_benchmark_quick(tmp_path, monkeypatch):
    """The VQ-VAE (two stages) stopped once by kill -9 and once by SIGINT at moments inside its
    fit, resumed, ends on the uninterrupted fit's parameters; the table is made from the JSON."""
    _quick("kill_resume.py", tmp_path)
    report = json.loads((tmp_path / "kill_resume-quick.json").read_text())
    (entry,) = report["models"]
    assert entry["model"] == "vqvae"
    assert [s["signal"] for s in entry["stops"]] == ["SIGKILL", "SIGINT"]
    for stop in entry["stops"]:
        assert stop["identical"] and stop["tensors"] > 10 and stop["ranks_stopped"], stop
        assert stop["resume_rc"] == 0
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import kill_resume

    assert kill_resume.markdown(report) == (tmp_path / "kill_resume-quick.md").read_text()
