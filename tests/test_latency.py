"""The latency protocol: side by side with a reference, adaptive, and repeatable."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from autocomp import latency


def busy(ms: float):
    def run() -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    return run


def test_the_quantile_interval_is_the_binomial_order_statistics():
    assert latency.quantile_interval(np.arange(10.0)) == (1.0, 8.0)  # median: ranks 2 and 9 of 10, 97.9% coverage
    assert latency.quantile_interval(np.arange(7.0)) == (0.0, 6.0)  # 7 values: the whole range (98.4%)
    rng = np.random.default_rng(0)  # coverage of the true quantiles of a standard normal
    for q, true in [(0.5, 0.0), (0.1, -1.2815516)]:
        hits = [lo <= true <= hi for lo, hi in (latency.quantile_interval(rng.standard_normal(60), q)
                                                for _ in range(2000))]
        assert 0.95 <= np.mean(hits) <= 0.995


def phased(ms: float, slower: float):
    """``busy(ms)``, but ``slower`` times as long in two of every five 0.3-second phases of the clock: a shared
    machine whose other work comes and goes, slowing each artifact by its own factor."""
    def run() -> None:
        slow = int(time.perf_counter() / 0.3) % 5 < 2
        busy(ms * (slower if slow else 1.0))()

    return run


def test_the_ratio_is_the_undisturbed_one_when_the_machine_slows_by_phases():
    # undisturbed 2.0; while disturbed 0.6 ms / 0.24 ms = 2.5, 40% of the time
    result = latency.compare(phased(0.4, 1.5), phased(0.2, 1.2), warmup_seconds=0.05, tolerance=0.02,
                             max_seconds=6.0, min_seconds=3.0)
    assert abs(result.ratio - 2.0) < 0.06
    assert result.p90_ms > 0.55  # the candidate's own spread still shows its disturbed runs (0.6 ms)


def test_a_measurement_caught_in_a_long_slow_phase_is_taken_again():
    # for its first 1.5 s, longer than a measurement (1 s), the machine never leaves the candidate alone: it runs
    # 1.5x to 3x slower, by a factor that changes every 30 ms; then it runs undisturbed
    begun = time.perf_counter()

    def candidate() -> None:
        elapsed = time.perf_counter() - begun
        slower = 1.5 + 1.5 * (int(elapsed / 0.03) * 7919 % 13) / 12 if elapsed < 1.5 else 1.0
        busy(0.4 * slower)()

    result = latency.compare(candidate, busy(0.2), warmup_seconds=0.0, tolerance=0.02, max_seconds=1.0)
    assert result.attempts == 2 and not result.noisy and abs(result.ratio - 2.0) < 0.1
    steady = latency.compare(busy(0.4), busy(0.2), warmup_seconds=0.0, tolerance=0.02, max_seconds=1.0)
    assert steady.attempts == 1 and not steady.noisy


def test_a_twice_as_slow_candidate_reads_as_ratio_two():
    result = latency.compare(busy(0.4), busy(0.2), warmup_seconds=0.05, tolerance=0.02, max_seconds=3.0)
    assert abs(result.ratio - 2.0) < 0.1 and result.ratio_ci <= 0.05
    assert result.p10_ms <= result.median_ms <= result.p90_ms and 0.35 < result.median_ms < 0.6
    assert result.runs >= latency.MIN_ROUNDS * 3


def test_an_artifact_s_speed_is_the_mean_over_its_sessions():
    # one of two candidate sessions 20% slower (as a session whose buffers landed badly): the mean, 0.44 ms
    result = latency.compare([busy(0.4), busy(0.48)], [busy(0.2), busy(0.2)], warmup_seconds=0.05,
                             tolerance=0.02, max_seconds=4.0)
    assert abs(result.ratio - 2.2) < 0.1
    with pytest.raises(ValueError, match="2 candidate sessions but 1 reference"):
        latency.compare([busy(0.1), busy(0.1)], [busy(0.1)], warmup_seconds=0.0, tolerance=0.02, max_seconds=1.0)


def test_an_artifact_alone_has_ratio_one_and_its_spread():
    result = latency.compare(*(2 * [busy(0.1)]), warmup_seconds=0.05, tolerance=0.02, max_seconds=3.0)
    assert result.ratio == 1.0 and result.runs >= latency.MIN_ROUNDS * 3


def spinning_process() -> Callable[[], None]:
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    neighbour = subprocess.Popen([sys.executable, "-c", spin])
    return lambda: (neighbour.kill(), neighbour.wait())


def hashing_thread() -> Callable[[], None]:  # a thread of this very process, on the other core (hashlib frees the GIL)
    stop, data = threading.Event(), bytes(1 << 25)
    worker = threading.Thread(target=lambda: [hashlib.sha256(data) for _ in iter(stop.is_set, True)])
    worker.start()
    return lambda: (stop.set(), worker.join())


@pytest.mark.parametrize("start", [spinning_process, hashing_thread])
def test_a_measurement_records_the_load_other_work_puts_on_the_machine(start):
    stop = start()
    time.sleep(0.3)  # started
    try:
        loaded = latency.compare(busy(0.2), busy(0.1), warmup_seconds=0.05, tolerance=0.02, max_seconds=1.0,
                                 min_seconds=1.0)
    finally:
        stop()
    assert 0.6 < loaded.load < 1.3, loaded.load  # one core busy beside the measurement
    assert loaded.as_metrics()["latency_load"] == loaded.load
