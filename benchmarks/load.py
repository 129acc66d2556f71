"""Load beyond this machine's cores: the search engine's throughput at 1 to 64 concurrent trials that sleep.

Training needs cores; the engine around it (the sampler's ask, the storage, the backends' scheduling) does not. So
each trial here is the search's own objective with its full run replaced by a sleep of 1-5 s (``tests.sleeping``:
the recipe is sampled, checked and stored, the metrics drawn). Every configuration runs a fresh study of the same
trials (the sleeps are drawn from the trial numbers) on a tiny task (``tests.tasks:plateau``) and the shipped joint
space, with NSGA-II:

- ``--workers N`` on one journal file, and on PostgreSQL (a server from the OS packages on 127.0.0.1);
- Ray Tune on a local Ray cluster of 64 logical CPUs (``ray start --num-cpus 64``), N workers (Tune trials) at once,
  on a journal.

Throughput is measured while all N ran (steady state: from the time N trials had begun their own work, their
sleeps, to the last trial's start; the start-up before it, the workers' or Ray's actors' starting and loading the
study and the task, is reported beside it): trials finished per hour, and ``busy``, the share of the N trial slots'
time spent in the trials' own work (their sleeps). Trials differ in length (their draws, and a recipe sampled again
is pruned unrun, which happens more often with some backends than others), so throughput against N times one
worker's is compared as busy shares: ``x = busy(N) / busy(1)``, 1 when N trials at once lose nothing to the
engine. A trial's engine time is its span (start to told) less its sleep; ``sampler`` is the searcher's share of
it (its ask and the last tell, timed in the trial's process), the rest is the storage's and the backend's. Lost
trials are those left RUNNING or FAIL; extra ones are finished beyond the count asked; ``run twice`` counts
complete trials whose recipe an earlier one ran. ``CPU s / trial`` is the machine's CPU time over the run per
finished trial, PostgreSQL's processes' share in brackets: what plans a cluster, where the workers have cores of
their own and the database is shared.

    .venv/bin/python benchmarks/load.py [--trials 500] [--concurrency 1 8 32 64] [--backends journal postgresql ray]

``make bench-load`` runs one worker of each backend side by side first, 150 trials each (each sleeps, so they hardly
compete for the cores; a rate needs no 500), then the rest one at a time, with those rows included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' sleeping objective, PostgreSQL and Ray helpers
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Ray's workers

from autocomp.search.optuna_runner import run_search  # noqa: E402
from autocomp.search.ray_runner import RayOptions  # noqa: E402
from autocomp.study import StudySpec  # noqa: E402
from tests.postgres import local_server  # noqa: E402
from tests.ray_cluster import local_cluster  # noqa: E402
from tests.sleeping import SLEEP_S, Sleeping  # noqa: E402

RAY_CPUS = 64
TARGET = 0.8  # of N x one worker's throughput, up to 32 concurrent trials (issue 23)


def spec_for(folder: Path, storage: str, trials: int) -> StudySpec:
    study = folder / "load.yaml"
    study.write_text(f"schema_version: 1\nstudy_name: load\ntask: tests.tasks:plateau\n"
                     f"space: {ROOT / 'search_spaces' / 'joint.yaml'}\ntrials: {trials}\nsampler: nsga2\n"
                     f"storage: {storage}\n")
    return StudySpec.load(study)


def meminfo(key: str) -> float:
    """A field of /proc/meminfo, GiB."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return info[key] / 2**20


def used_memory() -> float:
    """The machine's memory in use, GiB (MemTotal - MemAvailable): workers, Ray and PostgreSQL alike."""
    return meminfo("MemTotal") - meminfo("MemAvailable")


class PeakMemory(threading.Thread):
    """The most memory in use above ``used_memory()`` at the start, sampled every second while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.start_gib, self.peak_gib, self.done = used_memory(), 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.peak_gib = max(self.peak_gib, used_memory() - self.start_gib)


def cpu_seconds() -> tuple[float, float]:
    """CPU time used so far: by the whole machine (/proc/stat), and by PostgreSQL's processes (the storage)."""
    tick = os.sysconf("SC_CLK_TCK")
    machine = sum(int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:4]) / tick  # user+nice+sys
    postgres = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            if fields[0].endswith("(postgres"):  # utime, stime, and the children's: connections that ended
                postgres += sum(int(v) for v in fields[1].split()[11:15]) / tick
        except OSError:  # a process that ended meanwhile
            continue
    return machine, postgres


def run(backend: str, concurrency: int, trials: int, folder: Path, storage: str, address: str | None) -> dict:
    """One configuration's study, searched and read back into one row, with the machine's CPU time it took and
    the storage server's share."""
    spec = spec_for(folder, storage, trials)
    ray = RayOptions(address=address, max_concurrent=concurrency) if backend == "ray" else None
    memory = PeakMemory()
    memory.start()
    began, cpu = time.time(), cpu_seconds()
    try:
        study, _ = run_search(spec, progress=False, workers=1 if ray else concurrency, ray=ray, objective=Sleeping)
    finally:
        memory.done.set()
    wall, (machine, postgres) = time.time() - began, (b - a for a, b in zip(cpu, cpu_seconds(), strict=True))
    result = row(backend, concurrency, trials, study.get_trials(deepcopy=False), wall)
    return {**result, "peak_memory_gib": memory.peak_gib, "cpu_s_per_trial": machine / result["finished"],
            "storage_cpu_s_per_trial": postgres / result["finished"] if backend == "postgresql" else None}


def row(backend: str, concurrency: int, asked: int, trials: list[optuna.trial.FrozenTrial], wall: float) -> dict:
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    slept = [t for t in finished if "slept" in t.user_attrs]
    starts = sorted(t.datetime_start.timestamp() for t in finished)
    began = sorted(t.user_attrs.get("slept_at", t.datetime_start.timestamp()) for t in finished)
    begin, end = began[min(concurrency, len(began)) - 1], starts[-1]
    window = [t for t in finished if begin <= t.datetime_complete.timestamp() <= end]
    engine = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["slept"] for t in slept]
    sampler = [t.user_attrs["sampler_s"] for t in slept]
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"backend": backend, "concurrency": concurrency, "asked": asked, "finished": len(finished),
            "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")},
            "lost": sum(t.state.name in ("RUNNING", "FAIL") for t in trials), "extra": max(0, len(finished) - asked),
            "duplicates": duplicates(trials),
            "trials_per_hour": 3600 * len(window) / max(end - begin, 1e-9), "span_s": span, "wall_s": wall,
            "busy": sum(t.user_attrs.get("slept", 0.0) for t in window) / (concurrency * max(end - begin, 1e-9)),
            "startup_s": begin - min(starts), "mean_sleep_s": statistics.fmean(t.user_attrs["slept"] for t in slept),
            "engine_s_median": statistics.median(engine), "engine_s_p90": quantile(engine, 0.9),
            "sampler_s_median": statistics.median(sampler), "sampler_s_p90": quantile(sampler, 0.9)}


def busy(r: dict) -> float:
    """The share of the N trial slots' time spent in the trials' own work (their sleep) while all N ran: one
    worker's throughput, N times over, is a share of 1 (the rows of runs made before it was recorded: the whole
    run's share)."""
    if "busy" in r:
        return r["busy"]
    return r["states"]["COMPLETE"] * r["mean_sleep_s"] / (r["concurrency"] * r["span_s"])


def duplicates(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Complete trials whose recipe an earlier complete trial already ran (the engine checks each recipe against
    the finished and running trials: a race between two workers would run one twice)."""
    keys = [t.user_attrs.get("recipe_key") for t in trials if t.state.name == "COMPLETE"]
    return len(keys) - len(set(keys))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def memory_short(backend: str, concurrency: int, rows: list[dict]) -> str | None:
    """Why ``concurrency`` trials of ``backend`` would not fit in this machine's memory (None: they would), from the
    memory per trial the backend's largest run of 8 or more so far took; the kernel's OOM killer would end the
    workers."""
    runs = [r for r in rows if r["backend"] == backend and "skipped" not in r and r["concurrency"] >= 8]
    if not runs:  # one worker's peak is mostly fixed costs (and its runs ran side by side): no estimate
        return None
    largest = max(runs, key=lambda r: r["concurrency"])
    per_trial = largest["peak_memory_gib"] / largest["concurrency"]
    available = meminfo("MemAvailable")
    if concurrency * per_trial <= 0.9 * available:
        return None
    return (f"not run: {concurrency} x {per_trial:.2f} GiB per concurrent trial (at {largest['concurrency']}) "
            f"= {concurrency * per_trial:.0f} GiB, more than 90% of the {available:.0f} GiB available")


def storages(backend: str, folder: Path, server) -> str:
    if backend == "postgresql":
        return server.database(f"load_{folder.name.lower().replace('-', '_')}")
    return f"journal:///{folder / 'load.journal'}"


def cpu(r: dict) -> str:
    """The machine's CPU seconds per finished trial, with the storage server's in brackets (PostgreSQL)."""
    if r.get("cpu_s_per_trial") is None or r["concurrency"] == 1:  # one worker's runs ran side by side
        return "-"
    storage = r.get("storage_cpu_s_per_trial")
    return f"{r['cpu_s_per_trial']:.2f}" + (f" ({storage:.2f})" if storage is not None else "")


def table(rows: list[dict]) -> list[str]:
    one = {r["backend"]: busy(r) for r in rows if r["concurrency"] == 1 and "skipped" not in r}
    lines = ["| backend | concurrent trials | finished | lost | extra | run twice | trials / hour | busy "
             "| x (N x one worker) | engine s / trial, median (p90) | sampler s, median (p90) | CPU s / trial "
             "(PostgreSQL's) | start-up s | wall s | memory GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"postgresql": 0, "ray": 1, "journal": 2}
    for r in sorted(rows, key=lambda r: (order[r["backend"]], r["concurrency"])):
        if "skipped" in r:
            lines.append(f"| {r['backend']} | {r['concurrency']} | {r['skipped']} |" + " |" * 12)
            continue
        base = one.get(r["backend"])
        efficiency = f"{busy(r) / base:.2f}" if base else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["concurrency"] > 1 else "-"  # one worker's runs: side by side
        lines.append(f"| {r['backend']} | {r['concurrency']} | {r['finished']} | {r['lost']} | {r['extra']} "
                     f"| {r.get('duplicates', '-')} "
                     f"| {r['trials_per_hour']:,.0f} | {100 * busy(r):.0f}% | {efficiency} "
                     f"| {r['engine_s_median']:.2f} ({r['engine_s_p90']:.2f}) "
                     f"| {r['sampler_s_median']:.3f} ({r['sampler_s_p90']:.3f}) | {cpu(r)} | {r['startup_s']:.0f} "
                     f"| {r['wall_s']:.0f} | {memory} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--backends", nargs="+", default=["journal", "postgresql", "ray"],
                        choices=["journal", "postgresql", "ray"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.md")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the --out JSON file")
    parser.add_argument("--include", type=Path, nargs="*", default=[],
                        help="JSON files of other runs whose rows to add (one worker's runs of several backends, run "
                             "side by side: they sleep, so they do not compete for the cores)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the cluster and the driver agree whatever ~/.ray holds (Ray 2.60 enables tokens when ~/.ray/auth_token exists,
    # which a local ray.init() writes)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out_json = args.out.with_suffix(".json")
    rows = json.loads(out_json.read_text())["rows"] if args.resume and out_json.exists() else []
    rows += [r for path in args.include for r in json.loads(path.read_text())["rows"]]
    done = {(r["backend"], r["concurrency"]) for r in rows}
    with (local_server() if "postgresql" in args.backends else contextlib.nullcontext()) as server, \
            (local_cluster(nodes=1, cpus_per_node=RAY_CPUS) if "ray" in args.backends
             else contextlib.nullcontext()) as address:
        for backend in args.backends:
            for concurrency in args.concurrency:
                if (backend, concurrency) in done:
                    continue
                short = memory_short(backend, concurrency, rows)
                if short:
                    rows.append({"backend": backend, "concurrency": concurrency, "skipped": short})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                with tempfile.TemporaryDirectory(prefix=f"load-{backend}-{concurrency}-") as tmp:
                    folder = Path(tmp)
                    rows.append(run(backend, concurrency, args.trials, folder, storages(backend, folder, server),
                                    address))
                print(json.dumps(rows[-1]), flush=True)
                out_json.write_text(json.dumps({"rows": rows}, indent=2))
    lines = [f"`benchmarks/load.py --trials {args.trials}` on this machine ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}: trials sleeping {SLEEP_S[0]:g}-{SLEEP_S[1]:g} s (tests.sleeping), "
             f"NSGA-II on the joint space; Ray on a local cluster of {RAY_CPUS} logical CPUs. Target: at least "
             f"{TARGET} x N x one worker's throughput up to 32 concurrent trials on Ray and PostgreSQL, none lost.",
             "", *table(rows)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
