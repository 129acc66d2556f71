"""Does the cheap rung rank candidates as full trials do? Kendall's tau of each proxy against full fidelity.

For each task, ``--candidates`` recipes of the compact space (``search_spaces/compact.yaml``, the policy knobs over the
teacher's sensitivity map) are drawn at random (seeded), scored on the cheap rung (``autocomp.proxy``: no
fine-tune, BatchNorm recalibrated, fake-quantized as deployed) and then run in full through ``apply`` (the
space's fine-tune with early stopping, the deployed artifact measured side by side with the teacher's). Per
objective, Kendall's tau between the proxy's figure and the artifact's: validation accuracy, size in bytes and
latency (the latency table's prediction where one is given, else MACs). It also reports the proxy's seconds per
candidate against the full trial's.

    .venv/bin/python benchmarks/proxy_quality.py                          # digits, mnist1d, mnist1d_lean; ~30 min
    .venv/bin/python benchmarks/proxy_quality.py --tasks digits --candidates 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from scipy.stats import kendalltau
from tqdm import tqdm

from autocomp import proxy
from autocomp.allocation import Guide, tied_parameters
from autocomp.compress.facts import teacher_facts
from autocomp.measure import with_ratios
from autocomp.pipeline import apply, teacher_baseline
from autocomp.search.trials import narrow_to_model
from autocomp.sensitivity import cached
from autocomp.space import SearchSpace
from autocomp.tasks.load import load_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEASURE = {"warmup_seconds": 0.5, "tolerance": 0.03, "min_seconds": 1.0, "max_seconds": 3.0}


def candidates(task_name: str, count: int, seed: int) -> list:
    """``count`` recipes of the compact space for the task's teacher, drawn at random."""
    from autocomp.recipe import Measure

    task = load_task(task_name)
    facts = teacher_facts(task)
    space = SearchSpace.load(ROOT / "search_spaces" / "compact.yaml")
    narrow_to_model(space, task, task_name)
    guide = Guide(cached(task, progress=False), tied_parameters(task.teacher, task.example_input, facts.prunable,
                                                                task.train))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    recipes = []
    for _ in range(count):
        trial = study.ask()
        recipes.append(space.sample(trial, task_name, facts.prunable, seed=0, measure=Measure(**MEASURE),
                                    quantizable=facts.layers, guide=guide))
        study.tell(trial, 0.0)
    return task, recipes


def measure_task(task_name: str, count: int, seed: int, latency=None) -> dict:
    task, recipes = candidates(task_name, count, seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from autocomp.recipe import Measure

        baseline = teacher_baseline(task, Measure(**MEASURE), Path(tmp) / "teacher")
        for i, recipe in enumerate(tqdm(recipes, desc=task_name)):
            score = proxy.score(recipe, task, latency)
            started = time.perf_counter()
            result = apply(recipe, task, Path(tmp) / str(i), progress=False, reference=baseline.artifact)
            metrics = with_ratios(result.metrics, baseline.metrics)
            rows.append({"proxy": score.to_dict(), "full_seconds": time.perf_counter() - started,
                         "full": {k: metrics[k] for k in ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms",
                                                          "latency_ratio", "macs", "compression_ratio", "speedup")},
                         "recipe": {"level": max([p.sparsity for p in recipe.prune.layers.values()] or [0.0]),
                                    "bits": recipe.quantize.bits, "activation_bits": recipe.quantize.activation_bits}})
    return {"rows": rows, "tau": taus(rows),
            "proxy_seconds": statistics.median(r["proxy"]["seconds"] for r in rows),
            "full_seconds": statistics.median(r["full_seconds"] for r in rows)}


def taus(rows: list[dict]) -> dict[str, float]:
    """Kendall's tau between the proxy's and the artifact's value of each objective."""
    speed = "latency_ms" if rows and rows[0]["proxy"]["latency_ms"] is not None else "macs"
    pairs = {"val_accuracy": "val_accuracy", "size_bytes": "size_bytes", "latency_ms": speed}
    return {name: float(kendalltau([r["proxy"][p] for r in rows], [r["full"][name] for r in rows]).statistic)
            for name, p in pairs.items()}


def markdown(results: dict, count: int) -> str:
    lines = ["# Proxy quality", "", f"{count} random recipes of `search_spaces/compact.yaml` per task, each scored on "
             "the cheap rung and run in full. Kendall's tau of proxy against full fidelity.", "",
             "| task | accuracy tau | size tau | latency tau (proxy) | proxy s / candidate | full s / trial |",
             "|---|---:|---:|---:|---:|---:|"]
    for task, r in results.items():
        speed = "table" if r["rows"][0]["proxy"]["latency_ms"] is not None else "MACs"
        lines.append(f"| {task} | {r['tau']['val_accuracy']:.2f} | {r['tau']['size_bytes']:.2f} | "
                     f"{r['tau']['latency_ms']:.2f} ({speed}) | {r['proxy_seconds']:.2f} | {r['full_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "mnist1d_lean"])
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="predict latency with the latency table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    latency = None
    if args.table:
        from autocomp.latency_table import LatencyTable

        latency = LatencyTable().predict
    results = {}
    for task in args.tasks:
        results[task] = measure_task(task, args.candidates, args.seed, latency)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "proxy_quality.json").write_text(json.dumps(results, indent=1))
        (args.out / "proxy_quality.md").write_text(markdown(results, args.candidates))
        print(markdown(results, args.candidates), flush=True)


if __name__ == "__main__":
    main()
