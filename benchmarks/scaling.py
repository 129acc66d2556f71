"""Throughput of one study on this machine: 1 and 2 local workers and a 2-node local Ray cluster; and the
latency of one artifact pair timed alone and during a 2-worker search.

Every configuration runs the same study afresh (digits, the shipped joint space with 2-epoch fine-tunes,
``--trials`` trials) into its own journal file. Throughput is finished trials per hour between the first
trial's start and the last trial's end (the teacher's baseline and sensitivity map, measured once per study,
are left out; the whole command's wall-clock time is reported beside it). Latency under concurrency: a
trial's artifact against the teacher's, three timings alone, then three while a 2-worker search trains on
both cores (timings hold the machine's latency lock, so they never overlap the search's own timings).

    .venv/bin/python benchmarks/scaling.py [--trials 8] [--out benchmarks/results/scaling.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from autocomp.measure import time_artifact
from autocomp.pipeline import ARTIFACT, teacher_baseline
from autocomp.recipe import Measure
from autocomp.storage import open_storage
from autocomp.tasks.load import load_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' Ray cluster helper
from tests.ray_cluster import local_cluster  # noqa: E402

AUTOCOMP = str(Path(sys.executable).parent / "autocomp")


def study_file(folder: Path, trials: int) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "joint.yaml").read_text())
    space["finetune"]["epochs"] = {"low": 2, "high": 2}
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    path = folder / "scale.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: scale\ntask: digits\nspace: space.yaml\ntrials: {trials}\n"
                    "population_size: 4\nstorage: journal:///scale.journal\n")
    return path


def finished(folder: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(storage=open_storage(f"journal:///{folder / 'scale.journal'}"), study_name="scale")
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]


def throughput(name: str, extra: list[str], trials: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        began = time.time()
        done = subprocess.run([AUTOCOMP, "search", str(study_file(folder, trials)), "--no-progress", *extra],
                              capture_output=True, text=True)
        wall = time.time() - began
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
        ended = finished(folder)
        span = (max(t.datetime_complete for t in ended) - min(t.datetime_start for t in ended)).total_seconds()
        row = {"config": name, "trials": len(ended), "states": sorted({t.state.name for t in ended}),
               "span_s": span, "wall_s": wall, "trials_per_hour": 3600 * len(ended) / span}
        print(json.dumps(row), flush=True)
        return row


def latency_under_search(trials: int) -> dict:
    """Ratios of one artifact pair, alone and during a 2-worker search."""
    task = load_task("digits")
    x = task.example_input.numpy()
    spec = Measure()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([AUTOCOMP, "search", str(study_file(folder, 1)), "--no-progress"], check=True,
                       capture_output=True)
        (trial,) = finished(folder)
        storage = open_storage(f"journal:///{folder / 'scale.journal'}")
        meta = next(m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == ARTIFACT)
        candidate = folder / "candidate.onnx"
        download_artifact(artifact_store=FileSystemArtifactStore(str(folder / "scale_artifacts")),
                          artifact_id=meta.artifact_id, file_path=str(candidate))
        teacher = teacher_baseline(task, spec, folder / "teacher").artifact
        alone = [time_artifact(candidate, teacher, x, spec).ratio for _ in range(3)]
        busy = folder / "busy"
        busy.mkdir()
        search = subprocess.Popen([AUTOCOMP, "search", str(study_file(busy, trials)), "--workers", "2",
                                   "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while search.poll() is None and not (busy / "scale.journal").exists():
                time.sleep(1)
            time.sleep(20)  # the teacher's baseline and sensitivity are measured; trials are training
            during = [time_artifact(candidate, teacher, x, spec).ratio for _ in range(3)]
            still_running = search.poll() is None
        finally:
            search.kill()
            search.wait()
    row = {"alone": alone, "during_2_worker_search": during, "search_still_running": still_running,
           "difference": float(np.median(during) / np.median(alone) - 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_task("digits")  # the teacher trained (or cached) before anything is timed
    rows = [throughput("1 local worker", [], args.trials),
            throughput("2 local workers (journal file)", ["--workers", "2"], args.trials)]
    with local_cluster(nodes=2, cpus_per_node=1) as address:
        rows.append(throughput("Ray Tune, 2-node local cluster (1 CPU each)",
                               ["--backend", "ray", "--address", address], args.trials))
    latency = latency_under_search(args.trials)
    base = rows[0]["trials_per_hour"]
    lines = [f"`benchmarks/scaling.py --trials {args.trials}` on this machine ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}: the digits joint space, 2-epoch fine-tunes, one study per configuration.",
             "", "| configuration | trials | trials / hour | x one worker | trial span s | command wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['trials']} | {r['trials_per_hour']:.0f} | {r['trials_per_hour'] / base:.2f} "
              f"| {r['span_s']:.0f} | {r['wall_s']:.0f} |" for r in rows]
    lines += ["", "Latency ratio of one trial's artifact to the teacher's (autocomp.latency), three timings each:", "",
              f"- alone: {', '.join(f'{v:.3f}' for v in latency['alone'])}",
              f"- during a 2-worker search: {', '.join(f'{v:.3f}' for v in latency['during_2_worker_search'])}"
              f" (search still running at the end: {latency['search_still_running']})",
              f"- medians differ by {100 * latency['difference']:+.1f}%"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"throughput": rows, "latency": latency}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
