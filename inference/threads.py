"""
How many threads torch's CPU operations use during a fit, chosen by timing the fit's own steps.

Why the drivers do this: torch's OpenMP workers spin at the barrier that ends each parallel
operation before they sleep. On cores shared with other CPU-bound work, the worker a step waits for
is often descheduled while its partner spins away the time they were given. Measured on this
project's 2-core machine beside four busy processes (``benchmarks/load.py``, 2026-12-06, workers
spinning): a NUTS chain on two threads ran 14x slower than idle, on one thread 3.3x; a VAE epoch
9.6x against 3.5x; the EM fit 7.9x against 2.5x. With a single competitor a VAE step on two threads
was already 4x slower, on one thread no slower. Idle, two threads are 1.3-2x faster than one. No
fixed count is right for both, and the load changes during a fit, so the drivers time their steps on
each count now and then and keep the faster (``Threads.switches`` records when and to
what). How the workers wait is chosen once, before torch loads (``inference.omp_wait``: passively
where the machine is busy at the start)::

    tuner = Threads("auto")   # "auto", a number of threads (pinned), or "torch" (left alone)
    with tuner:               # torch's own count is restored on exit
        for batch in batches:
            step(batch)
            tuner.tick()      # after every step

``threads=None`` in a driver reads ``ZOO_THREADS`` ("auto" when unset). "auto" chooses between
torch's count at the start (``torch.get_num_threads()``, e.g. from ``OMP_NUM_THREADS``) and one
thread, never more than torch's count. Under ``torch.use_deterministic_algorithms(True)`` it
leaves the count alone: a full reduction (``x.sum()``) splits its work by thread, so one and two
threads can differ in the last bit of a loss; elementwise work, matrix products and per-row
reductions measured here agree bit for bit. Pin the count (``threads=2``) to rule it out.
"""

import math
import os
import statistics
import time
from typing import List, Optional, Union

import torch

ENV = "ZOO_THREADS"


def resolve(threads: Union[str, int, None]) -> Union[str, int]:
    """``threads`` as given, or from ``ZOO_THREADS``; checked."""
    if threads is None:
        threads = os.environ.get(ENV, "auto")
        where = f"{ENV}={threads!r}"
    else:
        where = f"threads={threads!r}"
    if isinstance(threads, str) and threads.strip().isdigit():
        threads = int(threads)
    if threads in ("auto", "torch"):
        return threads
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        return threads
    raise ValueError(f'{where}: use "auto", "torch" (leave torch\'s count alone) or a count >= 1')


class Threads:
    """Sets torch's intra-op thread count for the duration of a ``with`` block; in "auto" mode
    ``tick()`` after every step times the steps and switches between the candidate counts.

    Args:
        probe_steps: steps timed on each count per probe (the first step of the fit, and the first
            on a count not used before, which may start threads, are not timed).
        reject: a timed step on the second count that takes this many times the first count's median
            ends its probe at once.
        margin: one thread is chosen only when its median step is this fraction faster.
        hold: after a probe, keep the faster count for at least this many seconds, and for at least
            ``hold_factor`` times as long as the probe's timed steps took (probing costs steps on
            the slower count; an untimed step, such as a fit's first, which may compile for
            seconds, and time between steps do not count); each probe that confirms the count
            doubles the hold, up to ``max_hold``.
    """

    def __init__(
        self,
        threads: Union[str, int, None] = None,
        *,
        probe_steps: int = 3,
        hold: float = 5.0,
        hold_factor: float = 10.0,
        reject: float = 2.0,
        margin: float = 0.1,
        max_hold: float = 60.0,
    ):
        self.mode = resolve(threads)
        self.probe_steps, self.hold, self.hold_factor = probe_steps, hold, hold_factor
        self.reject, self.margin, self.max_hold = reject, margin, max_hold
        self.switches: List[tuple] = []  # (seconds from the start, count) at each change
        self._saved: Optional[int] = None
        self._active = False
        self._chosen: Optional[int] = None

    def __enter__(self):
        self._saved = torch.get_num_threads()
        self._start = time.perf_counter()
        self._used, self._skip = {self._saved}, True  # the first step warms up: not timed
        self._chosen, self._held = None, self.hold
        if isinstance(self.mode, int):
            self._set(self.mode)
        most = self._saved
        self._active = (
            self.mode == "auto" and most > 1 and not torch.are_deterministic_algorithms_enabled()
        )
        if self._active:
            # one thread first: where it is the slower count (idle) it is slower by at most
            # the parallel speed-up; where the other is slower (a busy machine) it can be
            # slower many times over, and the first such step ends its probe
            self._candidates = [1, most]
            self._begin_probe()
        return self

    def __exit__(self, *exc):
        if self._saved is not None and torch.get_num_threads() != self._saved:
            torch.set_num_threads(self._saved)
        self._active = False
        return False

    def _set(self, count: int) -> None:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
            self.switches.append((time.perf_counter() - self._start, count))
        if count not in self._used:  # its first step may start its threads: not timed
            self._used.add(count)
            self._skip = True

    def _begin_probe(self) -> None:
        self._probe = {count: [] for count in self._candidates}
        self._order = list(self._candidates)
        self._probe_spent = 0.0  # seconds of the probe's timed steps
        self._set(self._order[0])
        self._last = time.perf_counter()

    def new_phase(self) -> None:
        """Steps of another kind follow (EM's iterations after its k-means start): probe again
        from the next step on."""
        if self._active:
            self._begin_probe()

    def restart_clock(self) -> None:
        """The next step's time starts now: call after work that is not a step (an evaluation
        between epochs), so that it is not counted as one."""
        self._last = time.perf_counter()

    @property
    def chosen(self) -> Optional[int]:
        """The count the last finished probe chose (None before one has finished, and when the
        count is pinned or left alone); a probe in progress runs steps on either count."""
        return self._chosen

    def tick(self) -> None:
        """Call after every step."""
        if not self._active:
            return
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if self._order is None:  # holding the chosen count
            if now >= self._hold_until:
                self._begin_probe()
            return
        if self._skip:
            self._skip = False
            return
        self._probe_spent += elapsed
        count = self._order[0]
        timed = [t for c, times in self._probe.items() if c != count for t in times]
        if timed and elapsed > self.reject * statistics.median(timed):
            self._probe[count] = [math.inf]  # far slower than a count already timed: done
        else:
            self._probe[count].append(elapsed)
            if len(self._probe[count]) < self.probe_steps:
                return
        self._order.pop(0)
        if self._order:
            self._set(self._order[0])
            return
        medians = {c: statistics.median(t) for c, t in self._probe.items()}
        most = max(medians)  # the larger count, unless one thread is clearly faster (memory-
        # bound steps tie, and then the larger count is the better guess for what follows)
        best = 1 if medians[1] < (1 - self.margin) * medians[most] else most
        # the same answer twice: hold it twice as long (at most max_hold), a new one: from hold
        same = best == self._chosen
        self._held = min(2 * self._held, self.max_hold) if same else self.hold
        self._chosen = best
        self._set(best)
        self._order = None
        self._hold_until = now + max(self._held, self.hold_factor * self._probe_spent)
