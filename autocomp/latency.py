"""Latency that can rank: a candidate artifact timed side by side with a reference artifact.

One timing of a small model says little: a fresh ONNX Runtime session in a fresh process runs
25-30% slower for its first few hundred runs, and a shared machine drifts by 10-15% within an
hour. The protocol (README, "How latency is measured"):

1. **Warm-up by time.** Both sessions run alternately for ``warmup_seconds`` (at least
   ``MIN_WARMUP_RUNS`` runs each), so the timed runs see warm sessions, caches and clocks.
2. **Interleaved blocks.** Each round times one block of the candidate and one of the
   reference, in alternating order (ABBA), each block about ``BLOCK_SECONDS`` long, and keeps
   each block's median: both artifacts are sampled over the same stretch of time.
3. **The undisturbed speed.** This machine is shared: for seconds at a time other work slows both
   artifacts (here the same block took 0.13 ms, then 0.25 ms), and not by the same factor, so a
   ratio taken inside such a phase reads 5-15% off. Each artifact's speed is the 10th percentile
   (``QUANTILE``) of its block medians, the speed it runs at when nothing disturbs it, and the ratio
   is the candidate's over the reference's.
4. **Adaptive stop.** Rounds go on for at least ``min_seconds`` (so a measurement spans more than one
   phase of the machine) and ``MIN_ROUNDS`` rounds, then stop once the distribution-free 95%
   confidence interval of the ratio is within ``tolerance`` of it, or after ``max_seconds``. A
   measurement that did not get there is flagged ``noisy``.

The ratio is the number to trust; a study turns it into milliseconds with the latency its
teacher had when the study began (``measure.with_ratios``), so trials of one study, and the
replay of a recipe, are compared on one scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

MIN_WARMUP_RUNS = 20
MIN_ROUNDS = 7
QUANTILE = 0.1  # of the block medians: an artifact's speed when nothing else disturbs it
BLOCK_SECONDS = 0.02
MAX_BLOCK_RUNS = 200


@dataclass(frozen=True)
class Latency:
    median_ms: float  # the candidate's median run time, over every timed run
    p10_ms: float
    p90_ms: float
    ratio: float  # candidate / reference: the ratio of their block medians' QUANTILE
    ratio_ci: float  # half-width of the ratio's 95% confidence interval, relative to the ratio
    runs: int  # timed runs of the candidate
    noisy: bool  # the interval did not reach the tolerance within the time budget

    def as_metrics(self) -> dict[str, float]:
        return {"latency_raw_ms": self.median_ms, "latency_p10_ms": self.p10_ms, "latency_p90_ms": self.p90_ms,
                "latency_ratio": self.ratio, "latency_ratio_ci": self.ratio_ci, "latency_runs": self.runs,
                "latency_noisy": float(self.noisy)}


def quantile_interval(values: np.ndarray, q: float = 0.5, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the ``q`` quantile: the order statistics whose ranks a
    Binomial(n, q) count brackets with at least ``confidence`` (for small n up to the whole range)."""
    ordered = np.sort(values)
    n = len(ordered)
    low = max(int(binom.ppf((1 - confidence) / 2, n, q)), 1)  # 1-based ranks: [X_(low), X_(high)]
    high = min(int(binom.ppf((1 + confidence) / 2, n, q)) + 1, n)
    return float(ordered[low - 1]), float(ordered[high - 1])


def quantile_ratio(a: np.ndarray, b: np.ndarray, q: float = QUANTILE) -> tuple[float, float]:
    """The ratio of the ``q`` quantiles of ``a`` and ``b``, and the half-width of its 95% interval relative to
    it (from both quantiles' intervals, the widest combination)."""
    ratio = float(np.quantile(a, q) / np.quantile(b, q))
    (a_low, a_high), (b_low, b_high) = quantile_interval(a, q), quantile_interval(b, q)
    return ratio, max(a_high / b_low - ratio, ratio - a_low / b_high) / ratio


def _timed(run, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def compare(candidate, reference, *, warmup_seconds: float, tolerance: float, max_seconds: float,
            min_seconds: float = 0.0) -> Latency:
    """Time ``candidate()`` against ``reference()`` (callables running one inference each).

    Pass the same callable twice to time an artifact on its own: ``MIN_ROUNDS`` rounds of consecutive
    blocks, its ratio 1 by definition and its interval the stability of its block speeds.
    """
    same = candidate is reference
    start = time.perf_counter()
    warm = 0
    while warm < MIN_WARMUP_RUNS or time.perf_counter() - start < warmup_seconds:
        candidate()
        reference()
        warm += 1
    per_run = (time.perf_counter() - start) / (2 * warm)
    block = int(np.clip(round(BLOCK_SECONDS / max(per_run, 1e-9)), 3, MAX_BLOCK_RUNS))
    times: list[float] = []
    blocks: tuple[list[float], list[float]] = ([], [])  # block medians: candidate's, reference's
    begun = time.perf_counter()
    while True:
        first, second = (candidate, reference) if len(blocks[0]) % 2 == 0 else (reference, candidate)
        x, y = _timed(first, block), _timed(second, block)
        a, b = (x, y) if first is candidate else (y, x)  # the same callable twice: consecutive blocks
        times += a
        blocks[0].append(float(np.median(a)))
        blocks[1].append(float(np.median(b)))
        elapsed = time.perf_counter() - begun
        if len(blocks[0]) >= MIN_ROUNDS:
            ratio, ci = quantile_ratio(*map(np.asarray, blocks))
            if same or (ci <= tolerance and elapsed >= min(min_seconds, max_seconds)) or elapsed >= max_seconds:
                break
    p10, p50, p90 = np.percentile(np.asarray(times) * 1e3, [10, 50, 90])
    return Latency(float(p50), float(p10), float(p90), 1.0 if same else ratio, ci, len(times), ci > tolerance)
