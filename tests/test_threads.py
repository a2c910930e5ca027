"""The drivers' CPU thread count (inference.threads): pinned, left alone, or chosen by timing
steps whose speed depends on the count."""

import time
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import em, mcmc, svi
from inference.threads import ENV, Threads, resolve


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def fake_step(seconds_on):
    """A step that takes ``seconds_on[count]`` seconds on ``count`` threads."""

    def step():
        time.sleep(seconds_on[torch.get_num_threads()])

    return step


def run_steps(tuner, step, num_steps):
    counts = []
    with tuner:
        for _ in range(num_steps):
            step()
            counts.append(torch.get_num_threads())
            tuner.tick()
    return counts


def test_resolve_reads_the_environment_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve(None) == "auto"
    monkeypatch.setenv(ENV, "3")
    assert resolve(None) == 3
    assert resolve("torch") == "torch"
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ValueError, match="ZOO_THREADS='many'"):
        resolve(None)
    for bad in (0, -1, True, 1.5, "fast"):
        with pytest.raises(ValueError, match="threads="):
            resolve(bad)


def test_a_pinned_count_holds_for_the_block_and_is_restored(two_threads):
    counts = run_steps(Threads(1), lambda: None, 5)
    assert counts == [1] * 5
    assert torch.get_num_threads() == 2
    assert run_steps(Threads("torch"), lambda: None, 3) == [2, 2, 2]


def test_auto_keeps_one_thread_when_it_is_clearly_faster(two_threads):
    # two threads 5x slower, as measured on a busy machine: after the probe, one thread
    tuner = Threads("auto", hold=60)
    counts = run_steps(tuner, fake_step({1: 0.002, 2: 0.01}), 20)
    assert counts[-10:] == [1] * 10
    # the slow count's probe ends at its first timed step (after one untimed first use)
    assert counts.count(2) <= 2
    assert torch.get_num_threads() == 2  # restored


def test_auto_keeps_the_larger_count_when_it_is_faster_or_ties(two_threads):
    counts = run_steps(Threads("auto", hold=60), fake_step({1: 0.01, 2: 0.005}), 15)
    assert counts[-7:] == [2] * 7
    # memory-bound steps run as fast on either count: the larger one is kept
    counts = run_steps(Threads("auto", hold=60), fake_step({1: 0.005, 2: 0.005}), 15)
    assert counts[-7:] == [2] * 7


def test_auto_probes_again_when_its_hold_ends_and_follows_a_change_of_load(two_threads):
    # Steps of 5-50 ms and a hold of 0.3 s: a sleep that overshoots by a few milliseconds on a
    # busy machine moves no probe across the windows checked (with 2 ms steps and a 30 ms hold
    # it did, and CI failed on it). Idle, two threads are twice as fast as one; from step 40 on
    # they are five times slower, as when other work starts.
    slow = {"two": False}

    def step():
        if torch.get_num_threads() == 2:
            time.sleep(0.05 if slow["two"] else 0.005)
        else:
            time.sleep(0.01)

    tuner = Threads("auto", hold=0.3, hold_factor=1.0, max_hold=0.3)
    counts = []
    with tuner:
        for i in range(80):
            slow["two"] = i >= 40
            step()
            counts.append(torch.get_num_threads())
            tuner.tick()
    assert counts[30:40].count(2) >= 8  # idle: two threads held
    assert counts[-10:].count(1) >= 8  # loaded: one thread, after the next probe
    # the last finished probe chose one thread (the steps may end inside the next probe)
    assert tuner.chosen == 1 and all(c in (1, 2) for _, c in tuner.switches)


def test_an_untimed_first_step_does_not_stretch_the_hold(two_threads):
    # A fit's first step may compile for seconds; it is not timed, and must not count as probing
    # time either: a hold of hold_factor times it would keep a count chosen on one unlucky step for
    # the whole of a benchmark's fit. Here the first step takes 1 s, two threads are twice as fast
    # as one, but the first timed step on two threads is slow (another process's burst), so the
    # first probe chooses one thread. The hold that follows is hold_factor x the probe's timed
    # steps (0.16 s: 0.32 s), not x 1.16 s (2.3 s), and the next probe returns to two threads.
    calls = {"all": 0, "two": 0}

    def step():
        calls["all"] += 1
        if calls["all"] == 1:
            time.sleep(1.0)
        elif torch.get_num_threads() == 2:
            calls["two"] += 1
            time.sleep(0.1 if calls["two"] == 1 else 0.01)
        else:
            time.sleep(0.02)

    tuner = Threads("auto", hold=0.2, hold_factor=2.0, max_hold=0.2)
    counts = []
    with tuner:
        began = time.perf_counter()
        while time.perf_counter() - began < 2.2:
            step()
            counts.append(torch.get_num_threads())
            tuner.tick()
            if len(counts) == 6:  # the first probe: the untimed step, 3 on one thread, the burst
                assert tuner.chosen == 1
    # the last 20 steps run on two threads but for the next probes' three steps on one
    assert counts[-20:].count(2) >= 12, counts[-20:]
    assert tuner.chosen == 2


def test_auto_leaves_the_count_alone_under_deterministic_algorithms(two_threads):
    torch.use_deterministic_algorithms(True)
    try:
        counts = run_steps(Threads("auto"), fake_step({1: 0.001, 2: 0.01}), 10)
    finally:
        torch.use_deterministic_algorithms(False)
    assert counts == [2] * 10


def test_the_drivers_run_their_steps_on_the_count_asked_for(two_threads):
    seen = []

    def model(x):
        seen.append(torch.get_num_threads())
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    x = torch.randn(20)
    svi.fit(model, lambda x: None, x, batch_size=None, num_epochs=3, threads=1)
    assert seen[-3:] == [1, 1, 1] and torch.get_num_threads() == 2
    seen.clear()

    def mixture(x):
        seen.append(torch.get_num_threads())
        weights = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    with warnings.catch_warnings():  # three iterations do not converge, and are not meant to
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        em.fit(mixture, None, x, max_iter=3, tol=1e-12, init="params", threads=1)
    assert set(seen[-3:]) == {1} and torch.get_num_threads() == 2
    seen.clear()

    def normal(x):
        seen.append(torch.get_num_threads())
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    # NUTS's "auto" is one thread: its steps vary in length with the tree depth
    mcmc.sample_posterior(normal, x, chains=2, warmup=5, samples=5, threads="auto", workers=1)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


# --------------------------------------------------------------------------- OpenMP's wait policy
def test_wait_policy_turns_passive_only_on_a_busy_machine_before_torch_and_unset_by_the_user():
    from inference import omp_wait

    def choose(environ, others, modules=()):
        return omp_wait.choose(environ, {m: None for m in modules}, cores=2, others=lambda: others)

    environ = {}
    assert "PASSIVE" in choose(environ, others=2) and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {}
    assert "spin" in choose(environ, others=1) and environ == {}  # a core to spare
    environ = {}
    assert (
        "torch was imported first" in choose(environ, others=5, modules=["torch"]) and environ == {}
    )
    for name in omp_wait.VARIABLES:
        environ = {name: "ACTIVE" if name == "OMP_WAIT_POLICY" else "300000"}
        assert "left as set" in choose(environ, others=5) and len(environ) == 1
    environ = {}
    assert "no count" in choose(environ, others=None) and environ == {}
    assert omp_wait.decision.startswith("left alone: no count")


def test_importing_zoo_on_a_busy_machine_sets_the_policy_before_torch_loads():
    """The `zoo` command and `import zoo` reach omp_wait before torch: with more busy processes
    than cores, a fresh interpreter ends up with OMP_WAIT_POLICY=PASSIVE and torch not loaded."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this system: the policy is left alone there")
    cores = os.cpu_count() or 1
    from inference import omp_wait

    env = {k: v for k, v in os.environ.items() if k not in omp_wait.VARIABLES}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores + 1)]
    try:
        time.sleep(0.5)
        probe = (
            "import os, sys, zoo; from inference import omp_wait;"
            " print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, omp_wait.decision)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert out.stdout.split()[:2] == ["PASSIVE", "False"], out.stdout
