"""The latency protocol: side by side with a reference, adaptive, and repeatable.

The protocol runs here on a clock of its own (``latency.clock``), which only the fake artifacts below advance, each
by its own duration: a test reads what the protocol makes of those durations, whatever else the machine runs.
How the protocol fares on real artifacts on this machine is measured by ``make bench-latency``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest

from autocomp import latency
from autocomp.recipe import Measure


class FakeClock:
    """Seconds that pass only when a fake artifact runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = FakeClock()


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    CLOCK.now = 0.0
    monkeypatch.setattr(latency, "clock", CLOCK)
    return CLOCK


def busy(ms: float) -> Callable[[], None]:
    """A fake artifact whose every run takes ``ms`` milliseconds."""
    def run() -> None:
        CLOCK.now += ms / 1e3

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
        slow = int(CLOCK() / 0.3) % 5 < 2
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
    begun = CLOCK()

    def candidate() -> None:
        elapsed = CLOCK() - begun
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
    assert result.runs >= Measure.rounds * 3


def test_an_artifact_s_speed_is_the_mean_over_its_sessions():
    # one of two candidate sessions 20% slower (as a session whose buffers landed badly): the mean, 0.44 ms
    result = latency.compare([busy(0.4), busy(0.48)], [busy(0.2), busy(0.2)], warmup_seconds=0.05,
                             tolerance=0.02, max_seconds=4.0)
    assert abs(result.ratio - 2.2) < 0.1
    with pytest.raises(ValueError, match="2 candidate sessions but 1 reference"):
        latency.compare([busy(0.1), busy(0.1)], [busy(0.1)], warmup_seconds=0.0, tolerance=0.02, max_seconds=1.0)


def test_an_artifact_alone_has_ratio_one_and_its_spread():
    result = latency.compare(*(2 * [busy(0.1)]), warmup_seconds=0.05, tolerance=0.02, max_seconds=3.0)
    assert result.ratio == 1.0 and result.runs >= Measure.rounds * 3


def test_the_load_is_the_machines_busy_time_less_the_measuring_threads_own(monkeypatch):
    tick = os.sysconf("SC_CLK_TCK")
    # over 2 s the machine's cores were busy for 3 s, 1 s of it the measuring thread's own: one core elsewhere
    assert latency.cpu_elsewhere((0, 0), (3 * tick, 1 * tick), 2.0) == pytest.approx(1.0)
    assert latency.cpu_elsewhere((0, 0), (1 * tick, 2 * tick), 2.0) == 0.0  # never negative
    assert np.isnan(latency.cpu_elsewhere(None, (3 * tick, 1 * tick), 2.0))  # /proc did not tell
    ticks = iter([(0, 0), (5 * tick, 1 * tick)])  # the machine's ticks before and after one measurement
    monkeypatch.setattr(latency, "cpu_ticks", lambda: next(ticks))
    loaded = latency.compare(busy(0.2), busy(0.1), warmup_seconds=0.05, tolerance=0.02, max_seconds=1.0,
                             min_seconds=1.0)
    assert loaded.load == pytest.approx(4.0 / CLOCK.now)  # 4 s of other work over the measurement's seconds
    assert loaded.as_metrics()["latency_load"] == loaded.load
