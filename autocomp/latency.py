"""Latency that can rank: a candidate artifact timed side by side with a reference artifact.

One timing of a small model says little: a fresh ONNX Runtime session in a fresh process runs
25-30% slower for its first few hundred runs, and a shared machine drifts by 10-15% within an
hour. The protocol (README, "How latency is measured"):

1. **Warm-up by time.** Both sessions run alternately for ``warmup_seconds`` (at least
   ``MIN_WARMUP_RUNS`` runs each), so the timed runs see warm sessions, caches and clocks.
2. **Interleaved blocks.** Each round times one block of the candidate and one of the
   reference, in alternating order (ABBA), each block about ``BLOCK_SECONDS`` long, and keeps
   each block's median: both artifacts are sampled over the same stretch of time.
3. **Several sessions.** Two sessions of one model, in one process, run at speeds up to 4-7% apart
   (where their buffers land in memory), for as long as they live. Each artifact is timed through
   several sessions (``Measure.sessions``), the rounds taking them in turn, so a measurement averages
   over that luck instead of inheriting one draw of it.
4. **The undisturbed speed.** This machine is shared: for seconds at a time other work slows both
   artifacts, and not by the same factor, so a ratio taken inside such a phase reads 5-15% off. A
   session's speed is the 10th percentile (``QUANTILE``) of its block medians, the speed it runs at
   when nothing disturbs it; an artifact's is the mean over its sessions, and the ratio is the
   candidate's over the reference's.
5. **Adaptive stop.** Rounds go on for at least ``min_seconds`` (so a measurement spans more than one
   phase of the machine) and ``min_rounds`` rounds per session (``Measure.rounds``), then stop once the
   distribution-free 95% confidence interval of the ratio is within ``tolerance`` of it, or after
   ``max_seconds``. A measurement that did not get there (a slow phase outlasted it) is taken again, up
   to ``ATTEMPTS`` measurements, and the one with the tighter interval kept; flagged ``noisy`` if none
   got there.
6. **The load it was taken under.** The cores other work kept busy during the measurement (``load``, from
   /proc/stat less the measuring thread's own CPU time: other processes, and other threads of this one) are
   stored with it: a number taken beside other work is not a number of an idle machine, however tight its
   interval.

The ratio is the number to trust; a study turns it into milliseconds with the latency its
teacher had when the study began (``measure.with_ratios``), so trials of one study, and the
replay of a recipe, are compared on one scale.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import binom

from autocomp.recipe import Measure

MIN_WARMUP_RUNS = 20
QUANTILE = 0.1  # of the block medians: an artifact's speed when nothing else disturbs it
BLOCK_SECONDS = 0.02
MAX_BLOCK_RUNS = 200
ATTEMPTS = 2  # measurements at most: one caught in a slow phase longer than max_seconds is taken again

Runner = Callable[[], object]
clock = time.perf_counter  # what every duration here is read from (tests run the protocol on a clock of their own)


@dataclass(frozen=True)
class Latency:
    median_ms: float  # the candidate's median run time, over every timed run
    p10_ms: float
    p90_ms: float
    ratio: float  # candidate / reference: the ratio of their block medians' QUANTILE
    ratio_ci: float  # half-width of the ratio's 95% confidence interval, relative to the ratio
    runs: int  # timed runs of the candidate (in the measurement kept)
    noisy: bool  # the interval did not reach the tolerance within the time budget, in every attempt
    attempts: int = 1  # measurements taken: a noisy one is taken again (``ATTEMPTS``), the tighter kept
    load: float = float("nan")  # cores other work kept busy meanwhile (``cpu_elsewhere``; nan: unknown)

    def as_metrics(self) -> dict[str, float]:
        return {"latency_raw_ms": self.median_ms, "latency_p10_ms": self.p10_ms, "latency_p90_ms": self.p90_ms,
                "latency_ratio": self.ratio, "latency_ratio_ci": self.ratio_ci, "latency_runs": self.runs,
                "latency_noisy": float(self.noisy), "latency_attempts": self.attempts, "latency_load": self.load}


def cpu_ticks() -> tuple[int, int] | None:
    """CPU time in clock ticks: the whole machine's busy time (all but idle and iowait) and the calling thread's
    own (the one that runs the timed sessions: other threads of this process are other work too); None where
    /proc does not tell."""
    try:
        machine = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        own = open("/proc/thread-self/stat").read().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return sum(machine) - machine[3] - machine[4], int(own[11]) + int(own[12])  # utime, stime


def cpu_elsewhere(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float:
    """The cores other work (processes, threads) kept busy between two ``cpu_ticks`` readings ``seconds`` apart."""
    if before is None or after is None or seconds <= 0:
        return float("nan")
    (machine0, own0), (machine1, own1) = before, after
    return max(machine1 - machine0 - (own1 - own0), 0) / os.sysconf("SC_CLK_TCK") / seconds


def quantile_interval(values: np.ndarray, q: float = 0.5, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the ``q`` quantile: the order statistics whose ranks a
    Binomial(n, q) count brackets with at least ``confidence`` (for small n up to the whole range)."""
    ordered = np.sort(values)
    n = len(ordered)
    low = max(int(binom.ppf((1 - confidence) / 2, n, q)), 1)  # 1-based ranks: [X_(low), X_(high)]
    high = min(int(binom.ppf((1 + confidence) / 2, n, q)) + 1, n)
    return float(ordered[low - 1]), float(ordered[high - 1])


def session_speeds(blocks: Sequence[np.ndarray], q: float = QUANTILE) -> tuple[float, float, float]:
    """An artifact's speed from the block medians of each of its sessions: the mean over sessions of each
    one's ``q`` quantile, with a 95% interval (the sessions' intervals combined as independent errors)."""
    points = np.array([(np.quantile(v, q), *quantile_interval(v, q)) for v in blocks])
    mid = float(points[:, 0].mean())
    below, above = (float(np.sqrt(np.sum(d ** 2))) / len(points)
                    for d in (points[:, 0] - points[:, 1], points[:, 2] - points[:, 0]))
    return mid, mid - below, mid + above


def quantile_ratio(a: Sequence[np.ndarray], b: Sequence[np.ndarray], q: float = QUANTILE) -> tuple[float, float]:
    """The ratio of ``session_speeds`` of ``a`` and ``b`` (block medians per session), and the half-width of its
    95% interval relative to it (from both artifacts' intervals, the widest combination)."""
    (a_mid, a_low, a_high), (b_mid, b_low, b_high) = session_speeds(a, q), session_speeds(b, q)
    ratio = a_mid / b_mid
    return ratio, max(a_high / b_low - ratio, ratio - a_low / b_high) / ratio


def _timed(run, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = clock()
        run()
        times.append(clock() - start)
    return times


def compare(candidate: Runner | Sequence[Runner], reference: Runner | Sequence[Runner], *,
            warmup_seconds: float, tolerance: float, max_seconds: float, min_seconds: float = 0.0,
            min_rounds: int = Measure.rounds) -> Latency:
    """Time ``candidate`` against ``reference``: callables running one inference each, or for each artifact a
    sequence of them, one per session, which the rounds take in turn.

    Pass the same callables twice to time an artifact on its own: ``min_rounds`` rounds per session of
    consecutive blocks, its ratio 1 by definition and its interval the stability of its block speeds.
    """
    same = candidate is reference
    candidates, references = ([run] if callable(run) else list(run) for run in (candidate, reference))
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidate sessions but {len(references)} reference sessions")
    start, ticks = clock(), cpu_ticks()
    warm = 0
    while warm < MIN_WARMUP_RUNS or clock() - start < warmup_seconds:
        for pair in zip(candidates, references, strict=True):
            for run in pair:
                run()
        warm += 1
    per_run = (clock() - start) / (2 * warm * len(candidates))
    block = int(np.clip(round(BLOCK_SECONDS / max(per_run, 1e-9)), 3, MAX_BLOCK_RUNS))
    result = _rounds(candidates, references, block, same, tolerance, max_seconds, min_seconds, min_rounds)
    for attempt in range(2, ATTEMPTS + 1):  # a slow phase outlasted the rounds: measure afresh, keep the tighter
        if not result.noisy:
            break
        again = _rounds(candidates, references, block, same, tolerance, max_seconds, min_seconds, min_rounds)
        result = replace(min(result, again, key=lambda r: r.ratio_ci), attempts=attempt)
    return replace(result, load=cpu_elsewhere(ticks, cpu_ticks(), clock() - start))


def _rounds(candidates: list[Runner], references: list[Runner], block: int, same: bool, tolerance: float,
            max_seconds: float, min_seconds: float, min_rounds: int) -> Latency:
    """One measurement: rounds of interleaved blocks until the ratio's interval is within ``tolerance``."""
    times: list[float] = []
    sessions = len(candidates)
    blocks = [([], []) for _ in range(sessions)]  # per session: the candidate's block medians, the reference's
    begun = clock()
    for index in itertools.count():
        session, turn = index % sessions, index // sessions
        pair = (candidates[session], references[session])
        order = pair if turn % 2 == 0 else pair[::-1]
        x, y = _timed(order[0], block), _timed(order[1], block)
        a, b = (x, y) if order[0] is pair[0] else (y, x)  # the same callable twice: consecutive blocks
        times += a
        blocks[session][0].append(float(np.median(a)))
        blocks[session][1].append(float(np.median(b)))
        elapsed = clock() - begun
        if session == sessions - 1 and turn + 1 >= min_rounds:
            ratio, ci = quantile_ratio(*([np.asarray(s[k]) for s in blocks] for k in (0, 1)))
            if same or (ci <= tolerance and elapsed >= min(min_seconds, max_seconds)) or elapsed >= max_seconds:
                break
    p10, p50, p90 = np.percentile(np.asarray(times) * 1e3, [10, 50, 90])
    return Latency(float(p50), float(p10), float(p90), 1.0 if same else ratio, ci, len(times), ci > tolerance)
