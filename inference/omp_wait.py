"""
How torch's OpenMP workers wait between parallel operations, chosen before torch is loaded.

torch's CPU build runs its parallel operations on GNU OpenMP (libgomp). At the end of each one,
a worker spins (stays on its core, polling) for a while before it sleeps, so that the next
operation finds it awake. libgomp reads how long to spin from ``OMP_WAIT_POLICY`` and
``GOMP_SPINCOUNT`` once, when it is loaded, i.e. when torch is imported; nothing can change it
afterwards. The two settings suit opposite machines (this project's 2-core machine, one fresh
process per run, 2026-12-07):

- idle, spinning (libgomp's default) is faster where operations are small and many: an epoch of
  the eager VAE driver took 1.65 s spinning against 2.36 s with ``OMP_WAIT_POLICY=PASSIVE``
  (best of 3 runs each; 2.2-2.7 s against 2.6-3.2 s in the others);
- beside four busy processes, a spinning worker burns the time slices its process was given
  while it waits for a partner that is not running: EM's fit (K = 100 on MNIST) on two threads
  took 43 s spinning against 22 s passive (7.0 s and 7.5 s idle; one run each). In
  ``benchmarks/results/load.md``, under the drivers' defaults: EM 2.96x its idle time with this
  module against 4.24x spinning, a VAE epoch 2.91x against 4.21x.

So ``import inference`` (and ``import zoo``, and the ``zoo`` command) looks at the machine once,
before torch is loaded: where at least as many other tasks are runnable as there are cores,
it sets ``OMP_WAIT_POLICY=PASSIVE`` in the environment; on a machine with cores to spare it
changes nothing. ``inference.threads`` then times the steps on one thread and on all of torch's
threads as before, and keeps the faster.

It does nothing when:

- torch is already imported (import ``inference`` or ``zoo`` first, or set the variable yourself);
- ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set (your choice is kept: ``OMP_WAIT_POLICY=ACTIVE``
  spins always, ``PASSIVE`` never);
- the count of runnable tasks cannot be read (``/proc/loadavg``: Linux only).

The choice is made once: load that starts after the import is met by the thread count alone.
The environment variable is inherited by child processes (data workers, notebook kernels), which
then wait passively too. ``decision`` says what was done and why.
"""

import os
import sys
import time
from typing import Callable, Optional

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

decision: str = "not yet chosen"


def others_runnable(samples: int = 5, interval: float = 0.002) -> Optional[int]:
    """How many tasks besides this one are runnable now, machine-wide: the median over
    ``samples`` readings of the running count in ``/proc/loadavg`` (the reading process is one
    of them); None where the file cannot be read."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = f.read().split()[3].split("/")[0]
            counts.append(int(running) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def choose(
    environ=None,
    modules=None,
    cores: Optional[int] = None,
    others: Callable[[], Optional[int]] = others_runnable,
) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` where the machine is busy now, torch is not
    loaded yet and the user set neither variable; returns (and stores in ``decision``) what was
    done and why."""
    global decision
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    cores = cores or os.cpu_count() or 1
    set_by_user = [name for name in VARIABLES if name in environ]
    if set_by_user:
        decision = f"left as set: {', '.join(f'{n}={environ[n]}' for n in set_by_user)}"
    elif "torch" in modules:
        decision = "left alone: torch was imported first, and libgomp has read its settings"
    else:
        busy = others()
        if busy is None:
            decision = "left alone: no count of runnable tasks (/proc/loadavg) to go by"
        elif busy >= cores:
            environ["OMP_WAIT_POLICY"] = "PASSIVE"
            decision = (
                f"OMP_WAIT_POLICY=PASSIVE: {busy} other tasks runnable on {cores} cores at import"
            )
        else:
            decision = f"left alone (workers spin): {busy} other tasks runnable on {cores} cores"
    return decision
