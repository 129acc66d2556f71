"""Does the per-layer latency table (``autocomp.latency_table``) rank what the artifacts measure?

For each teacher, ten candidates: every pruning group pruned by L1 to one level (0, 0.3, 0.5, 0.7, 0.85; local
scope, no fine-tuning), deployed fp32 and static int8 (min-max, per channel), each through ``autocomp.pipeline.apply``
and measured side by side with the teacher's artifact (``latency_ratio``, a short protocol: ``MEASURE``). The table
predicts each candidate's milliseconds from the pruned torch model and its int8 layers; its predicted ratio to the
teacher is its prediction over the teacher's. Reported per task:

- **Kendall tau** between the predicted and the measured ratios of the ten candidates (scipy.stats.kendalltau);
- **ratio error**: predicted ratio / measured ratio - 1, its median magnitude and its largest;
- **building the table**: a fresh table per teacher, the seconds and graphs its predictions timed (the teacher's
  and the ten candidates' geometries), and the milliseconds of one prediction once every entry is known.

A prediction ranks candidates of a search's cheap rung; it is never reported as a latency.

    .venv/bin/python benchmarks/latency_table.py [--tasks digits mnist1d mnist1d_lean] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from autocomp.compress.facts import teacher_facts
from autocomp.features import layer_names
from autocomp.latency import cpu_elsewhere, cpu_ticks
from autocomp.latency_table import INT8, LatencyTable
from autocomp.pipeline import apply, teacher_baseline
from autocomp.recipe import FineTune, LayerPrune, Measure, Prune, Quantize, Recipe
from autocomp.tasks.load import load_task

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (0.0, 0.3, 0.5, 0.7, 0.85)
MEASURE = Measure(warmup_seconds=0.5, min_seconds=1.0, max_seconds=3.0)


def candidate(task: str, groups: list[str], level: float, int8: bool) -> Recipe:
    """Every group pruned to ``level`` by L1 (one-shot, no fine-tuning), deployed fp32 or static int8."""
    prune = Prune(layers={g: LayerPrune(level, "l1") for g in groups}) if level else Prune()
    return Recipe(task=task, prune=prune, quantize=INT8 if int8 else Quantize(), finetune=FineTune(epochs=0),
                  measure=MEASURE)


def run(name: str, folder: Path) -> dict:
    task = load_task(name)
    table = LatencyTable(folder / f"{name}-table.json")
    baseline = teacher_baseline(task, MEASURE, folder / name / "teacher")
    groups = list(dict.fromkeys(layer.group for layer in teacher_facts(task).prunable.values()))
    building = [0.0]

    def predict(model, int8_layers: list[str]) -> float:
        started = time.perf_counter()
        ms = table.predict(model, task.example_input, int8_layers)
        building[0] += time.perf_counter() - started
        return ms

    teacher_ms = predict(task.teacher, [])
    rows = []
    for level in LEVELS:
        for int8 in (False, True):
            recipe = candidate(name, groups, level, int8)
            result = apply(recipe, task, folder / name / f"{level}-{int8}", progress=False, reference=baseline.artifact)
            int8_layers = [n for n in layer_names(result.model) if recipe.quantize.activation_bits_of(n) == 8]
            predicted = predict(result.model, int8_layers)
            m = result.metrics
            rows.append({"level": level, "precision": "int8" if int8 else "fp32", "predicted_ms": predicted,
                         "predicted_ratio": predicted / teacher_ms, "measured_ratio": m["latency_ratio"],
                         "measured_ratio_ci": m["latency_ratio_ci"], "measured_ms": m["latency_raw_ms"],
                         "noisy": bool(m["latency_noisy"]), "load": m["latency_load"],
                         "ratio_error": predicted / teacher_ms / m["latency_ratio"] - 1,
                         "fp32_fallbacks": sorted(result.fp32_layers)})
    started = time.perf_counter()
    for _ in range(20):
        table.predict(result.model, task.example_input, int8_layers)  # every entry known: the cheap rung's cost
    tau = kendalltau([r["predicted_ratio"] for r in rows], [r["measured_ratio"] for r in rows])
    errors = np.abs([r["ratio_error"] for r in rows])
    return {"tau": float(tau.statistic), "tau_p": float(tau.pvalue), "median_abs_ratio_error": float(np.median(errors)),
            "max_abs_ratio_error": float(errors.max()), "build_seconds": building[0],
            "graphs_timed": len(table.entries),
            "prediction_ms": (time.perf_counter() - started) / 20 * 1e3, "teacher_predicted_ms": teacher_ms,
            "teacher_measured_ms": baseline.metrics["latency_raw_ms"], "candidates": rows}


def markdown(results: dict, settings: dict) -> str:
    lines = [f"`benchmarks/latency_table.py` on this machine ({settings['machine']}), {settings['date']}, "
             f"{settings['minutes']:.1f} minutes; cores busy with other work while it ran: "
             f"{settings['load_elsewhere']:.2f} (of {os.cpu_count()}).", "",
             "Ten candidates per teacher (every group pruned by L1 to 0, 0.3, 0.5, 0.7, 0.85, no fine-tuning; fp32 and "
             "static int8), each measured side by side with the teacher (`latency_ratio`, warm-up 0.5 s, 1-3 s) and "
             "predicted by a fresh table. Ratio error: predicted ratio / measured ratio - 1. One prediction: its "
             "entries all in the table (a forward pass with hooks). Load: cores other work kept busy while the "
             "candidate was timed.", "",
             "| task | Kendall tau (p) | median abs ratio error | max abs ratio error | table build s | graphs timed "
             "| one prediction ms | teacher predicted / measured ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tau']:.2f} ({r['tau_p']:.1g}) | {100 * r['median_abs_ratio_error']:.0f}% "
                     f"| {100 * r['max_abs_ratio_error']:.0f}% | {r['build_seconds']:.1f} | {r['graphs_timed']} "
                     f"| {r['prediction_ms']:.1f} | {r['teacher_predicted_ms']:.3f} / {r['teacher_measured_ms']:.3f} |")
    lines += ["", "| task | pruned | precision | predicted ms | predicted ratio | measured ratio (95% CI) "
                  "| ratio error | load |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for c in r["candidates"]:
            flag = " noisy" if c["noisy"] else ""
            ci = f"±{100 * c['measured_ratio_ci']:.1f}%{flag}"
            lines.append(f"| {name} | {c['level']} | {c['precision']} | {c['predicted_ms']:.4f} "
                         f"| {c['predicted_ratio']:.3f} | {c['measured_ratio']:.3f} ({ci}) "
                         f"| {100 * c['ratio_error']:+.0f}% | {c['load']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "mnist1d_lean"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    begun, ticks = time.time(), cpu_ticks()
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, Path(tmp)) for name in args.tasks}
    settings = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                "minutes": (time.time() - begun) / 60, "levels": LEVELS, "measure": dataclasses.asdict(MEASURE),
                "load_elsewhere": cpu_elsewhere(ticks, cpu_ticks(), time.time() - begun)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency_table.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    (args.out / "latency_table.md").write_text(markdown(results, settings))
    print(markdown(results, settings))


if __name__ == "__main__":
    main()
