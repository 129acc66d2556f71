"""A long search in one process: does its memory stay flat, and its per-trial overhead stay level, over hundreds of
trials?

One study of ``--trials`` trials (default 300) of a tiny task (``tests.tasks:plateau``, an MLP of 4-16-2) with the
cheapest recipes (one-epoch fine-tunes of channel pruning, fp32 or int8, the shortest timing) on a journal file,
run in this process by the local backend as ``autocomp search`` runs it. A thread samples the process's resident
memory (RSS) every 0.1 s. A trial's overhead is its span (started to told) less the stages its recipe ran
(compress, deploy, measure: ``seconds``), plus the wait since the trial before it ended: what the engine spends
around the work (asking, storing, checking duplicates, notes).

Targets (issue 23): the last 100 trials' median RSS within 10% of the first 100's, and their overhead no higher.

    .venv/bin/python benchmarks/soak.py [--trials 300] [--out benchmarks/results/soak.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tiny task

from autocomp.search.optuna_runner import run_search  # noqa: E402
from autocomp.study import StudySpec  # noqa: E402

SPACE = """schema_version: 1
prune: {scope: local, granularity: channel, sparsity: {low: 0.0, high: 0.5}, criteria: [l1, l2]}
quantize: {activation_bits: [32, 8]}
distill: {kind: [none, logits]}
finetune: {epochs: 1, lr: {low: 1.0e-4, high: 1.0e-2, log: true}, batch_size: 64}
"""
MEASURE = ("measure: {warmup_seconds: 0.0, tolerance: 0.5, max_seconds: 0.1, min_seconds: 0.0, sessions: 1, "
           "rounds: 3}\n")
WINDOW = 100  # trials compared at the start and at the end


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


class Sampler(threading.Thread):
    """(seconds since start, RSS MiB) every 0.1 s until ``done`` is set."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.began, self.samples, self.done = time.time(), [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.samples.append((time.time() - self.began, rss_mib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp)
        (folder / "space.yaml").write_text(SPACE)
        (folder / "soak.yaml").write_text(f"schema_version: 1\nstudy_name: soak\ntask: tests.tasks:plateau\n"
                                          f"space: space.yaml\ntrials: {args.trials}\n"
                                          f"storage: journal:///soak.journal\n{MEASURE}")
        sampler = Sampler()
        sampler.start()
        study, _ = run_search(StudySpec.load(folder / "soak.yaml"), progress=False)
        sampler.done.set()
        began = sampler.began
        trials = sorted((t for t in study.trials if t.datetime_complete), key=lambda t: t.datetime_start)
    rows, previous_end = [], None
    for t in trials:
        start, end = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        work = sum(t.user_attrs.get("seconds", {}).values())
        wait = 0.0 if previous_end is None else max(0.0, start - previous_end)
        rows.append({"number": t.number, "state": t.state.name, "start_s": start - began, "end_s": end - began,
                     "work_s": work, "overhead_s": (end - start) - work + wait})
        previous_end = end
    rss = [(s, m) for s, m in sampler.samples if rows[0]["start_s"] <= s <= rows[-1]["end_s"]]
    first, last = rows[:WINDOW], rows[-WINDOW:]

    def during(window: list[dict]) -> list[float]:
        return [m for s, m in rss if window[0]["start_s"] <= s <= window[-1]["end_s"]]

    result = {"trials": len(rows), "states": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED",
                                                                                              "FAIL")},
              "rss_mib_first": statistics.median(during(first)), "rss_mib_last": statistics.median(during(last)),
              "rss_mib_max": max(m for _, m in rss),
              "overhead_s_first": statistics.median(r["overhead_s"] for r in first),
              "overhead_s_last": statistics.median(r["overhead_s"] for r in last),
              "work_s_median": statistics.median(r["work_s"] for r in rows),
              "wall_s": rows[-1]["end_s"] - rows[0]["start_s"]}
    result["rss_change"] = result["rss_mib_last"] / result["rss_mib_first"] - 1
    result["overhead_change"] = result["overhead_s_last"] / result["overhead_s_first"] - 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": result, "trials": rows, "rss": rss}, indent=1))
    plot(rows, rss, args.out.with_suffix(".png"))
    lines = [f"`benchmarks/soak.py --trials {args.trials}` on this machine ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}: one process, the local backend, a journal file; "
             f"{result['states']['COMPLETE']} complete, {result['states']['PRUNED']} pruned, "
             f"{result['states']['FAIL']} failed in {result['wall_s'] / 60:.1f} min "
             f"(a trial's work {result['work_s_median']:.2f} s, median).", "",
             f"| | first {WINDOW} trials | last {WINDOW} trials | change | target |", "|---|---:|---:|---:|---|",
             f"| RSS, median MiB | {result['rss_mib_first']:.0f} | {result['rss_mib_last']:.0f} "
             f"| {100 * result['rss_change']:+.1f}% | within 10% |",
             f"| overhead per trial, median s | {result['overhead_s_first']:.3f} | {result['overhead_s_last']:.3f} "
             f"| {100 * result['overhead_change']:+.1f}% | no growth |", "",
             f"Peak RSS {result['rss_mib_max']:.0f} MiB. Curve: `{args.out.with_suffix('.png').name}`."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], rss: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = [r["end_s"] for r in rows]

    def trial_at(seconds: float) -> int:
        return sum(e <= seconds for e in ends)

    figure, (memory, overhead) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    memory.plot([trial_at(s) for s, _ in rss], [m for _, m in rss], lw=1)
    memory.set_ylabel("RSS, MiB")
    memory.set_ylim(bottom=0)
    memory.set_title("One search process over its trials (benchmarks/soak.py)")
    overhead.plot(range(1, len(rows) + 1), [r["overhead_s"] for r in rows], ".", ms=3)
    overhead.set_ylabel("overhead per trial, s")
    overhead.set_xlabel("trials finished")
    overhead.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
