"""
Exact resume, measured: every registered model fitted through `zoo fit`, stopped at random
moments by kill -9 or by SIGINT, continued with `zoo fit NAME --resume RUN`, and compared
tensor by tensor with the same fit never stopped.

    python benchmarks/kill_resume.py                        # every model, 6 stops each (~30 min)
    python benchmarks/kill_resume.py --models vae vqvae --stops 20
    python benchmarks/kill_resume.py --torchrun             # also the VAE under 2 torchrun ranks
    python benchmarks/kill_resume.py --quick --out /tmp/x   # the VQ-VAE's two stages, the tests

For each model (its first driver that runs the training loop, small settings on the 8x8
digits): one uninterrupted fit, watched to learn when its run folder gets config.json (the fit
starts) and params.pt (training ends, both stages for the VQ-VAE); then each stop: the same
command again in a fresh folder, a signal at a moment drawn uniformly in the training window's
length after its config.json appears (alternately SIGKILL and SIGINT, from a seeded generator;
counted from the fit's start, as imports take longer on a busy machine), and the resume. A
stop that leaves no config.json leaves nothing to resume: the fit is started again, as a user
would. The report gives, per stop, the signal, the moment, where the checkpoint stood
(epoch and step), the exit codes, and whether every tensor of params.pt equals the
uninterrupted fit's (the largest absolute difference where not). Under torchrun the signal
goes to the launcher alone, as a user's kill would; its ranks must stop (they die with it) and
leave the run resumable.

Runs use `ZOO_THREADS=torch` and one thread, so that two fits of one command take the same
arithmetic path (a thread count that changes between them can move a reduction's last bit).
"""

import argparse
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import _rates  # noqa: E402
import torch  # noqa: E402

from zoo import registry  # noqa: E402

# flags that make a model small on the digits, with epochs of tens of steps so that a stop
# lands inside an epoch as often as between two; a model not named here runs on its defaults
SMALL = {
    "bmm": ["--data", "digits", "-k", "3"],
    "gmm": ["--data", "faithful", "--batch-size", "4"],
    "diffusion": ["--data", "digits", "--steps", "10"],
    "ssvae": ["--data", "digits", "--labels", "50"],
    "vqvae": ["--data", "digits", "--channels", "8", "--num-codes", "8", "--code-dim", "4",
              "--prior-channels", "8", "--prior-layers", "1"],
}  # fmt: skip
COMMON = ["--quiet", "--eval-samples", "2", "--epochs", "3"]
ROWS = ["--max-data", "1000", "--batch-size", "8"]  # 125 steps an epoch
QUICK_ROWS = ["--max-data", "480", "--batch-size", "16"]  # 30


def command(name: str, driver: str, quick: bool = False) -> list:
    flags = SMALL.get(name, ["--data", "digits"])
    rows = [] if "--batch-size" in flags else QUICK_ROWS if quick else ROWS
    return ["fit", name, *flags, *rows, *COMMON, "--inference", driver]


def launcher(torchrun: bool) -> list:
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "zoo.cli"]  # fmt: skip
    return [sys.executable, "-m", "zoo.cli"]


ENV = {**os.environ, "ZOO_THREADS": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def start(argv, torchrun, log: Path):
    """The command in a new process, its stderr into ``log`` (a pipe left unread could fill
    and stop it)."""
    with open(log, "w") as err:
        return subprocess.Popen([*launcher(torchrun), *map(str, argv)], env=ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip


def watched(argv, run: Path, torchrun: bool):
    """The uninterrupted fit, and the seconds after its start at which config.json and
    params.pt appeared in its folder."""
    began = time.perf_counter()
    log = run.parent / f"{run.name}.log"
    process = start(argv, torchrun, log)
    seen = {}
    while process.poll() is None:
        for name in ("config.json", "params.pt"):
            if name not in seen and (run / name).exists():
                seen[name] = time.perf_counter() - began
        time.sleep(0.01)
    if process.returncode != 0:
        raise SystemExit(
            f"the uninterrupted fit failed: {' '.join(map(str, argv))}\n{log.read_text()}"
        )
    total = time.perf_counter() - began
    return seen.get("config.json", 0.0), seen.get("params.pt", total), total


def wait_gone(run: Path, seconds: float = 60.0) -> bool:
    """Whether the run's lock is free within ``seconds``: every process of the stopped fit
    has ended (a killed launcher's ranks die with it)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if not _held(run / ".zoo-lock"):
            return True
        time.sleep(0.1)
    return False


def _held(lock: Path) -> bool:
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def position(run: Path) -> dict:
    """Each checkpoint of the run (a stage's too) and its [epoch, step]."""
    where = {}
    for path in sorted(run.glob("checkpoint*.pt")):
        saved = torch.load(path, weights_only=True)
        where[path.name] = [saved["position"]["epoch"], saved["position"]["step"]]
    return where


def compare(run: Path, straight: Path) -> dict:
    a = torch.load(run / "params.pt", weights_only=True)
    b = torch.load(straight / "params.pt", weights_only=True)
    if set(a) != set(b):
        return {"identical": False, "tensors": len(b), "differing": sorted(set(a) ^ set(b))}
    differing = [name for name in b if not torch.equal(a[name], b[name])]
    gaps = [float((a[n].double() - b[n].double()).abs().max()) for n in differing]
    largest = max(gaps, default=0.0)
    return {"identical": not differing, "tensors": len(b), "differing": differing,
            "max_abs_difference": largest}  # fmt: skip


def one_stop(name, argv, run, straight, moment, signum, torchrun) -> dict:
    log = run.parent / f"{run.name}.log"
    process = start([*argv, "--out", run], torchrun, log)
    while process.poll() is None and not (run / "config.json").exists():
        time.sleep(0.005)  # the moment counts from the fit's start: imports vary with the load
    began = time.perf_counter()
    while process.poll() is None and time.perf_counter() - began < moment:
        time.sleep(0.005)
    landed = process.poll() is None
    if landed:
        process.send_signal(signum)  # to the launcher alone, as a user's kill would
    process.wait()
    row = {"signal": signal.Signals(signum).name, "moment_s": round(moment, 3),
           "landed": landed, "stopped_rc": process.returncode,
           "ranks_stopped": wait_gone(run), "checkpoint_at": position(run)}  # fmt: skip
    if (run / "config.json").exists():
        again = [*argv[:2], "--resume", run, "--quiet"]
        row["continued_by"] = "--resume"
    else:  # stopped before the fit began: nothing to resume, the fit is started again
        again = [*argv, "--out", run, "--overwrite"]
        row["continued_by"] = "a new fit"
    done = start(again, torchrun, log)
    done.wait()
    row["resume_rc"] = done.returncode
    if done.returncode != 0:
        row["resume_error"] = log.read_text().strip().splitlines()[-1:]
        row["identical"] = False
        return row
    row.update(compare(run, straight))
    return row


def run_model(name, out: Path, stops: int, rng: random.Random, torchrun: bool, quick: bool) -> dict:
    spec = registry.get(name)
    driver = next((d for d in spec.drivers if d in ("svi", "reparam")), None)
    if driver is None:
        return {"model": name, "skipped": "EM fits keep no checkpoint (they restart)"}
    argv = command(name, driver, quick)
    label = f"{name} (torchrun, 2 ranks)" if torchrun else name
    folder = out / (name + ("-torchrun" if torchrun else ""))
    folder.mkdir(parents=True)
    straight = folder / "straight"
    first, trained, total = watched([*argv, "--out", straight], straight, torchrun)
    print(f"{label}: uninterrupted fit {total:.1f} s (training from {first:.1f} s to"
          f" {trained:.1f} s)", flush=True)  # fmt: skip
    rows = []
    for i in range(stops):
        signum = signal.SIGKILL if i % 2 == 0 else signal.SIGINT
        moment = rng.uniform(0, trained - first)
        row = one_stop(name, argv, folder / f"stop{i}", straight, moment, signum, torchrun)
        rows.append(row)
        verdict = "identical" if row.get("identical") else "DIFFERS"
        print(f"  {row['signal']:7s} {moment:6.2f} s in, checkpoint {row['checkpoint_at']},"
              f" {row['continued_by']}: {verdict}", flush=True)  # fmt: skip
    return {"model": label, "driver": driver, "command": "zoo " + " ".join(argv),
            "uninterrupted_s": total, "training_window_s": [first, trained], "stops": rows,
            "identical": sum(bool(r.get("identical")) for r in rows)}  # fmt: skip


def markdown(report) -> str:
    lines = [
        "# Exact resume after kill -9 and SIGINT",
        "",
        f"{report['date']}, {report['machine']}; load average (1 min) {report['load'][0]:.2f}"
        f" at the start, {report['load'][1]:.2f} at the end. Seed {report['seed']}.",
        "",
        "| model | driver | stops | SIGKILL identical | SIGINT identical | inside an epoch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for entry in report["models"]:
        if "skipped" in entry:
            lines.append(f"| {entry['model']} | EM | 0 | - | - | - |")
            continue
        stops = entry["stops"]
        by = {s: [r for r in stops if r["signal"] == s] for s in ("SIGKILL", "SIGINT")}
        inside = sum(1 for r in stops if any(s > 0 for _, s in r["checkpoint_at"].values()))
        cells = [f"{sum(bool(r.get('identical')) for r in rs)}/{len(rs)}" for rs in by.values()]
        lines.append(f"| {entry['model']} | {entry['driver']} | {len(stops)} | {cells[0]} |"
                     f" {cells[1]} | {inside} |")  # fmt: skip
    lines += [
        "",
        "identical: every tensor of params.pt equal (torch.equal) to the uninterrupted fit's."
        " inside an epoch: stops whose checkpoint was saved mid-epoch (SIGINT saves at the step"
        " it finished; kill -9 leaves the last epoch's).",
        "",
        "Commands (each stop: the same with another --out, then `zoo fit NAME --resume RUN`):",
        "",
        *(f"    {e['command']}" for e in report["models"] if "command" in e),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--models", nargs="+", default=None, help="default: every model")
    parser.add_argument("--stops", type=int, default=6, help="stops per model (default 6)")
    parser.add_argument("--torchrun", action="store_true", help="also the VAE on 2 ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the VQ-VAE, 2 stops, less data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    names = args.models or (["vqvae"] if args.quick else registry.names())
    stops = 2 if args.quick else args.stops
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="kill_resume-"))
    load = [_rates.load_average()]
    entries = [run_model(name, scratch, stops, rng, False, args.quick) for name in names]
    if args.torchrun:
        entries.append(run_model("vae", scratch, stops, rng, True, args.quick))
    load.append(_rates.load_average())
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs",
        "load": load,
        "seed": args.seed,
        "models": entries,
    }
    name = "kill_resume-quick" if args.quick else "kill_resume"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    shutil.rmtree(scratch)
    print(markdown(report))
    failed = [e["model"] for e in entries if "stops" in e and e["identical"] < len(e["stops"])]
    if failed:
        raise SystemExit(f"not resumed exactly: {', '.join(failed)}")


if __name__ == "__main__":
    main()
