"""Hot and cold milliseconds of small ONNX graphs, timed side by side: what the latency table's entries hold
(``autocomp.latency_table``). Hot runs go back to back; a cold run follows a flush of the L2 cache, so a model whose
weights outgrow it is predicted from the cold times."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from autocomp import latency, runtime

TIMING_SECONDS = 0.15  # per graph, after warm-up: about two thirds hot blocks, a third cold runs
BLOCK_SECONDS = 0.005
COLD_RUNS = 5  # per round and graph, each after a flush of the L2 cache
SESSIONS = 3  # per graph
MIN_ROUNDS = 3  # per session
WARMUP_RUNS = 20

Timing = tuple[float, float]  # milliseconds per inference: hot (runs back to back), cold (after a cache flush)


def time_onnx(files: Sequence[tuple[Path, np.ndarray]], threads: int = 1, seconds: float = TIMING_SECONDS
              ) -> list[Timing]:
    """Hot and cold milliseconds per inference of each ONNX file on its input, timed side by side in ``SESSIONS``
    sessions each (``runtime.session``; sessions of one model run a few percent apart for as long as they live,
    ``autocomp.latency``). After ``WARMUP_RUNS`` runs each, rounds take every file in turn, in the round's session:
    one block of runs back to back (about ``BLOCK_SECONDS``: its mean is hot) and ``COLD_RUNS`` runs each after a
    flush of the L2 cache (their median is cold), for ``seconds`` per file and at least ``MIN_ROUNDS`` rounds per
    session. A session's times are the ``latency.QUANTILE`` quantile of its rounds, the speed undisturbed by other
    work, and a file's the mean over its sessions; side by side, every file is sampled over the same stretch of
    time. Holds the machine's latency lock (``measure.LATENCY_LOCK``)."""
    from filelock import FileLock

    from autocomp.measure import LATENCY_LOCK

    sessions = []
    for path, x in files:
        opened = [runtime.session(path, threads=threads) for _ in range(SESSIONS)]
        sessions.append([functools.partial(sess.run, None, {sess.get_inputs()[0].name: x}) for sess in opened])
    rounds: list[list[list[Timing]]] = [[[] for _ in range(SESSIONS)] for _ in files]
    buffer = np.zeros(2 * l2_bytes() // 8)
    with FileLock(LATENCY_LOCK):
        counts = [_runs_per_block(runs) for runs in sessions]
        end = time.perf_counter() + seconds * len(files)
        for turn in itertools.count():
            if turn >= MIN_ROUNDS * SESSIONS and time.perf_counter() >= end:
                break
            for runs, count, timings in zip(sessions, counts, rounds, strict=True):
                run = runs[turn % SESSIONS]
                begun = time.perf_counter()
                for _ in range(count):
                    run()
                hot = (time.perf_counter() - begun) / count
                cold = float(np.median([_after_flush(run, buffer) for _ in range(COLD_RUNS)]))
                timings[turn % SESSIONS].append((hot, cold))
    return [tuple(1e3 * np.mean([np.quantile(t, latency.QUANTILE, axis=0) for t in per_session], axis=0))
            for per_session in rounds]


def _runs_per_block(runs: Sequence[Callable[[], object]]) -> int:
    """Warm the sessions ``runs`` up (``WARMUP_RUNS`` runs each) and count the runs that fill a block of
    ``BLOCK_SECONDS``."""
    for run in runs:
        for _ in range(WARMUP_RUNS):
            run()
    start = time.perf_counter()
    runs[0]()
    return max(1, round(BLOCK_SECONDS / (time.perf_counter() - start)))


def _after_flush(run: Callable[[], object], buffer: np.ndarray) -> float:
    """Seconds of one ``run`` after writing ``buffer`` (twice the L2 cache): the weights come from beyond it."""
    np.add(buffer, 1.0, out=buffer)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@functools.cache
def l2_bytes() -> int:
    """The L2 cache of one core (Linux sysfs), else 1 MiB."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        except (OSError, ValueError):
            break
    return 2**20
