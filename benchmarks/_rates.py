"""What the speed benchmarks share: honest clocks on a GPU, the machine's own GEMM rate, the
machine's load, and whether the NumPyro peer (the ``[peers]`` extra) is installed."""

import os
import time
from typing import Optional, Tuple

import torch


def synchronize(device) -> None:
    """Wait for the GPU's queued work, so that a host clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int = 5, device="cpu") -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed warm-up call;
    on a GPU each clock waits for the device's queued work first."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(n: int = 2048, repeats: int = 5, device="cpu") -> float:
    """float32 GFLOP/s of an n x n matrix product on ``device``: the fastest of ``repeats``
    after one untimed product."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_time(lambda: a @ b, repeats, device) / 1e9


def numpyro_available() -> bool:
    """Whether jax and NumPyro import (``pip install .[peers]``)."""
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return True


def load_average() -> float:
    """The machine's 1-minute load average (runnable tasks, this run's own included), NaN where
    the platform does not report one: beside a timing, it says whether the machine was idle."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def cpu_ticks(path: str = "/proc/stat") -> Optional[Tuple[int, int]]:
    """(steal, total) clock ticks of all CPUs since boot, from Linux's /proc/stat; None elsewhere.
    Steal is the time a virtual CPU was ready to run while the hypervisor ran something else:
    the load of other machines on the same host, which the load average does not see."""
    try:
        with open(path) as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def steal_fraction(before: Optional[Tuple[int, int]], after: Optional[Tuple[int, int]]) -> float:
    """The fraction of the CPUs' time between two ``cpu_ticks`` readings that was stolen by the
    hypervisor (NaN where they are not available)."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


class MachineState:
    """The machine's state over a benchmark run: made at the start, ``finish()`` at the end
    gives the date, the load average at both ends and the steal in between (a dict for the
    JSON report), and ``sentence(state, threads)`` says it in words for the Markdown one."""

    def __init__(self):
        self.load, self.ticks = load_average(), cpu_ticks()

    def finish(self) -> dict:
        return {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_1min": [self.load, load_average()],
            "steal_fraction": steal_fraction(self.ticks, cpu_ticks()),
        }

    @staticmethod
    def sentence(state: dict, threads: int) -> str:
        start, end = state["load_average_1min"]
        return (
            f"Machine state: {state['date']}, load average (1 min) {start:.2f} at the start and"
            f" {end:.2f} at the end (the run itself keeps about {threads} tasks runnable; much"
            " more means other work shared the machine); the hypervisor took"
            f" {100 * state['steal_fraction']:.1f}% of the CPUs' time during the run (steal:"
            " other machines on the same host)."
        )
