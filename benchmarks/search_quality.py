"""Does the search beat the hand-made pipeline? Five methods at an equal wall-clock budget, on test.

For each task, seed and method one fresh study runs through ``autocomp.search.optuna_runner.run_search``
(the path ``autocomp search`` takes), on the task's shipped study (``studies/TASK.yaml``: its space,
objectives and sampler settings) and one measurement protocol for all:

- ``uniform``: the hand-made grid, every group pruned to one level by L1, logits
  distillation (alpha 0.7, T 4), the space's longest fine-tune, fp32 and static int8 (min-max, per
  channel): the space's warm-start policies, level after level from coarse to fine (0.5, 0.8, 0.65, 0.35,
  0.85, ...), as many as the budget holds;
- ``random``, ``tpe`` (multivariate), ``nsga2``: the shipped space without its warm start or screening;
- ``autocomp``: the shipped study as it is (NSGA-II, warm start, sensitivity, screening where it has them; its
  space chooses the student too: the teacher, or a new network of a family the task's data fits);
- ``no_students``: ``autocomp`` without the student choice (the teacher, pruned and quantized), the question being
  whether student search helps at equal budget (``make bench-students``).

Every method gets the same wall-clock budget per task (``BUDGETS``, or ``--budget`` seconds), counted from
the start of its run (the teacher's baseline included): it starts trials until then, and the trial running
then finishes. The teacher's sensitivity map is analysed once per task before the runs, as
``autocomp sensitivity`` or a first study would, and every autocomp run reads it from the cache of maps, as a
user's later studies of the same teacher do; its one-time cost is reported beside the budgets. Trials are
chosen on validation and reported on test:

- **hypervolume** of the validation front's test points, in a space normalised to the teacher: accuracy as
  (test accuracy - teacher's + 5 pp) / 5 pp (the teacher at 1, five points worse at 0), log2 of the size
  ratio and log2 of the speedup, both 0 at the teacher; reference point (0, 0, 0), so a point counts only
  where it is smaller, faster and within 5 pp of the teacher;
- **best size ratio** and **best speedup** among trials within 1.0 pp of the teacher on validation, with
  their test drop;
- **time to 90%** of the run's final hypervolume, from the start of the run;
- **overhead**: the share of the run's wall-clock time spent outside ``apply`` (sampling, storage, the
  teacher's baseline), and measurement's share (accuracy and latency of artifacts).

    .venv/bin/python benchmarks/search_quality.py            # the full suite, about 50 minutes here
    .venv/bin/python benchmarks/search_quality.py --quick    # digits, one seed, about 5 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from autocomp import sensitivity
from autocomp.config import read_yaml, write_yaml
from autocomp.recipe import Measure
from autocomp.search.fidelity import as_losses, non_domination_ranks
from autocomp.search.optuna_runner import run_search
from autocomp.study import StudySpec
from autocomp.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("uniform", "random", "tpe", "nsga2", "autocomp", "no_students")
GRID_LEVELS = [0.5, 0.8, 0.65, 0.35, 0.85, 0.7, 0.6, 0.75, 0.2, 0.55, 0.45]  # coarse to fine: any budget is a grid
BUDGETS = {"digits": 50.0, "mnist1d": 75.0, "mnist1d_lean": 40.0}  # seconds per run: the 45 runs fit in an hour
# one protocol for every method, cheaper than a study's (at least 1 s of rounds, not 5): ratios are compared
MEASURE = Measure(warmup_seconds=0.5, tolerance=0.03, min_seconds=1.0, max_seconds=3.0)
ACCURACY_SPAN = 0.05  # hypervolume counts points within 5 pp of the teacher
WITHIN_PP = 1.0
TARGETS = {"size_vs_uniform": 1.5, "speedup_vs_uniform": 1.3, "hv_vs_uniform": 1.15, "hv_vs_random": 1.05,
           "overhead": 0.05}


def method_spec(base: StudySpec, method: str, seed: int, folder: Path) -> StudySpec:
    """The study one method runs: the shipped study, its space and sampler changed as the method says."""
    space = read_yaml(base.space, "search space")
    spec = dataclasses.replace(base, study_name=f"{base.study_name}-{method}-{seed}", seed=seed, measure=MEASURE,
                               storage=f"sqlite:///{folder / 'studies.db'}",
                               artifacts=str(folder / f"{base.study_name}-{method}-{seed}"))
    if method == "uniform":
        space["warm_start"] = {"levels": GRID_LEVELS, "sensitivity": False}
        spec = dataclasses.replace(spec, sampler="random", screening=None, trials=2 * len(GRID_LEVELS))
    elif method == "no_students":
        space.pop("student", None)
    elif method != "autocomp":
        space.pop("warm_start", None)
        spec = dataclasses.replace(spec, sampler=method, screening=None)
    path = folder / f"{spec.study_name}.space.yaml"
    write_yaml(space, path)
    return dataclasses.replace(spec, space=str(path))


def points(trials, teacher: dict) -> np.ndarray:
    """Test points of ``trials`` in the normalised space (maximised): accuracy, log2 size ratio, log2 speedup."""
    base = teacher["test_accuracy"] - ACCURACY_SPAN
    return np.array([[(t.user_attrs["metrics"]["test_accuracy"] - base) / ACCURACY_SPAN,
                      math.log2(t.user_attrs["metrics"]["compression_ratio"]),
                      math.log2(t.user_attrs["metrics"]["speedup"])] for t in trials]).reshape(-1, 3)


def val_front(trials, directions: list[str]) -> list:
    """The trials no other trial beats on every objective (validation values, as the study ranks them)."""
    ranks = non_domination_ranks(as_losses([t.values for t in trials], directions))
    return [t for t, rank in zip(trials, ranks, strict=True) if rank == 0]


def hypervolume(trials, teacher: dict, directions: list[str]) -> float:
    from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG; the public API has none for 3-D

    front = points(val_front(trials, directions), teacher)
    front = front[(front > 0).all(axis=1)]
    return float(compute_hypervolume(-front, np.zeros(3))) if len(front) else 0.0


def best_within(trials, metric: str) -> dict:
    """The trial with the best ``metric`` among those within 1.0 pp of the teacher on validation."""
    near = [t for t in trials if t.user_attrs["metrics"]["val_drop_pp"] <= WITHIN_PP]
    if not near:
        return {"value": 1.0, "test_drop_pp": 0.0, "trial": None}
    best = max(near, key=lambda t: t.user_attrs["metrics"][metric])
    m = best.user_attrs["metrics"]
    return {"value": m[metric], "test_drop_pp": m["test_drop_pp"], "val_drop_pp": m["val_drop_pp"],
            "trial": best.number}


def evaluate(study, started: float, wall: float) -> dict:
    """The run's numbers (module docstring), from its stored trials."""
    teacher, directions = study.user_attrs["teacher"], [d.name.lower() for d in study.directions]
    done = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete)
    final = hypervolume(done, teacher, directions)
    reached = next((t.datetime_complete.timestamp() - started for i, t in enumerate(done)
                    if hypervolume(done[: i + 1], teacher, directions) >= 0.9 * final), None) if final else None
    stages = {stage: sum(s.get(stage, 0.0) for t in study.trials
                         for s in (t.user_attrs.get("seconds", {}), t.user_attrs.get("screen", {}).get("seconds", {})))
              for stage in ("compress", "deploy", "measure")}
    states = [t.state.name for t in study.trials]
    return {
        "trials": len(states), "complete": states.count("COMPLETE"), "screened_out": states.count("PRUNED"),
        "failed": states.count("FAIL"), "wall_s": wall, "hypervolume": final, "time_to_90_s": reached,
        "best_size": best_within(done, "compression_ratio"), "best_speedup": best_within(done, "speedup"),
        "overhead": (wall - sum(stages.values())) / wall, "measure_share": stages["measure"] / wall,
        "export_share": stages["deploy"] / wall,
        "front": [{"trial": t.number, **{k: t.user_attrs["metrics"][k] for k in
                                         ("val_accuracy", "test_accuracy", "compression_ratio", "speedup")}}
                  for t in val_front(done, directions)],
        "teacher": {k: teacher[k] for k in ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms")},
    }


def run(task: str, method: str, seed: int, budget: float, folder: Path) -> dict:
    spec = method_spec(StudySpec.load(ROOT / "studies" / f"{task}.yaml"), method, seed, folder)
    print(f"\n== {task} / {method} / seed {seed}: {budget:.0f} s", flush=True)
    started = time.time()
    study, _ = run_search(spec, trials=spec.trials if method == "uniform" else 10**6, seed=seed, timeout=budget)
    result = evaluate(study, started, time.time() - started)
    print(f"   {result['complete']} complete, {result['screened_out']} screened out, {result['failed']} failed; "
          f"hypervolume {result['hypervolume']:.3f}; best size {result['best_size']['value']:.1f}x, "
          f"speedup {result['best_speedup']['value']:.2f}x; overhead {100 * result['overhead']:.1f}%", flush=True)
    return result


def summarise(runs: dict) -> dict:
    """Per task and method: the mean and spread over seeds, and autocomp against the baselines."""
    table: dict = {}
    for task, methods in runs.items():
        table[task] = {}
        for method, seeds in methods.items():
            values = {"hypervolume": [r["hypervolume"] for r in seeds],
                      "best_size": [r["best_size"]["value"] for r in seeds],
                      "best_speedup": [r["best_speedup"]["value"] for r in seeds],
                      "size_test_drop_pp": [r["best_size"]["test_drop_pp"] for r in seeds],
                      "speedup_test_drop_pp": [r["best_speedup"]["test_drop_pp"] for r in seeds],
                      "time_to_90_s": [r["time_to_90_s"] for r in seeds if r["time_to_90_s"] is not None],
                      "overhead": [r["overhead"] for r in seeds], "measure_share": [r["measure_share"] for r in seeds],
                      "complete": [r["complete"] for r in seeds], "wall_s": [r["wall_s"] for r in seeds]}
            table[task][method] = {k: {"mean": statistics.fmean(v) if v else None,
                                       "sd": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in values.items()}
        rows = table[task]
        if {"autocomp", "uniform", "random"} <= set(rows):
            mean = {m: {k: v["mean"] for k, v in rows[m].items()} for m in rows}
            table[task]["vs"] = {
                "size_vs_uniform": mean["autocomp"]["best_size"] / mean["uniform"]["best_size"],
                "speedup_vs_uniform": mean["autocomp"]["best_speedup"] / mean["uniform"]["best_speedup"],
                "hv_vs_uniform": mean["autocomp"]["hypervolume"] / max(mean["uniform"]["hypervolume"], 1e-9),
                "hv_vs_random": mean["autocomp"]["hypervolume"] / max(mean["random"]["hypervolume"], 1e-9),
                "overhead": mean["autocomp"]["overhead"],
            }
        if {"autocomp", "no_students"} <= set(rows):
            table[task]["autocomp_vs_no_students"] = {
                key: rows["autocomp"][key]["mean"] / max(rows["no_students"][key]["mean"], 1e-9)
                for key in ("hypervolume", "best_size", "best_speedup")}
    return table


def markdown(table: dict, settings: dict) -> str:
    lines = [f"# Search quality ({settings['mode']})", "",
             f"Seeds {settings['seeds']}; budget per run (s): {settings['budgets']}; sensitivity map, once per task "
             f"(s): {settings['sensitivity_map_s']}; measurement {settings['measure']};"
             f" {settings['machine']}; {settings['minutes']:.1f} minutes in all.", "",
             "Trials chosen on validation, reported on test. Hypervolume: module docstring of "
             "`benchmarks/search_quality.py` (teacher at 0). Mean +- sd over seeds.", ""]
    for task, rows in table.items():
        lines += [f"## {task}", "", "| method | trials complete | hypervolume | best size within 1 pp (test drop) | "
                  "best speedup within 1 pp (test drop) | time to 90% HV (s) | overhead | measurement |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            if method not in rows:
                continue
            r = rows[method]

            def f(key: str, fmt: str = ".2f", scale: float = 1.0, r: dict = r) -> str:
                m = r[key]["mean"]
                return "-" if m is None else f"{scale * m:{fmt}} +- {scale * r[key]['sd']:{fmt}}"

            lines.append(f"| {method} | {f('complete', '.1f')} | {f('hypervolume', '.3f')} | {f('best_size', '.1f')}x "
                         f"({f('size_test_drop_pp')} pp) | {f('best_speedup')}x ({f('speedup_test_drop_pp')} pp) | "
                         f"{f('time_to_90_s', '.0f')} | {f('overhead', '.1f', 100)}% | "
                         f"{f('measure_share', '.1f', 100)}% |")
        if "vs" in rows:
            vs = rows["vs"]
            lines += ["", "| target (autocomp) | wanted | measured |", "|---|---|---|"]
            for key, wanted in TARGETS.items():
                got = f"{100 * vs[key]:.1f}%" if key == "overhead" else f"{vs[key]:.2f}x"
                want = f"<= {100 * wanted:.0f}%" if key == "overhead" else f">= {wanted}x"
                ok = vs[key] <= wanted if key == "overhead" else vs[key] >= wanted
                lines.append(f"| {key.replace('_', ' ')} | {want} | {got} {'met' if ok else 'missed'} |")
        if "autocomp_vs_no_students" in rows:
            ratios = ", ".join(f"{key.replace('_', ' ')} {v:.2f}x"
                               for key, v in rows["autocomp_vs_no_students"].items())
            lines += ["", f"Student search in the space (autocomp / no_students, means): {ratios}."]
        lines.append("")
    return "\n".join(lines)


def plot(task: str, methods: dict, path: Path) -> None:
    """Every method's validation front (first seed) on test: accuracy against size ratio and against speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    teacher = next(iter(methods.values()))[0]["teacher"]
    for method, seeds in methods.items():
        front = seeds[0]["front"]
        for ax, key in zip(axes, ("compression_ratio", "speedup"), strict=True):
            ax.scatter([p[key] for p in front], [100 * p["test_accuracy"] for p in front], label=method, s=22,
                       marker="o" if method == "autocomp" else "x")
    for ax, label in zip(axes, ("size ratio (teacher / artifact)", "speedup (ONNX Runtime, batch 1)"), strict=True):
        ax.axhline(100 * teacher["test_accuracy"] - WITHIN_PP, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(100 * teacher["test_accuracy"] - 10, 100 * teacher["test_accuracy"] + 1.5)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{task}: each method's front (chosen on validation), dashed: teacher - 1 pp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, one seed")
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "mnist1d_lean"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:-1]), choices=METHODS,
                        help="default: all but no_students (make bench-students compares it with autocomp)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, help="seconds per run (default: BUDGETS)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="search_quality", help="results file name (a subset of methods)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds = ["digits"], [0]
    budgets: dict = {}
    maps: dict = {}  # task -> seconds its sensitivity map took, once
    begun = time.time()
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            runs[task] = {m: [] for m in args.methods}
            budgets[task] = args.budget or BUDGETS[task]
            started = time.time()
            sensitivity.cached(load_task(task), recompute=True)
            maps[task] = round(time.time() - started, 1)
            for seed in args.seeds:
                for method in args.methods:
                    runs[task][method].append(run(task, method, seed, budgets[task], Path(tmp)))
            write(runs, args, budgets, maps, begun)  # after every task: an interrupted suite keeps what it measured


def write(runs: dict, args: argparse.Namespace, budgets: dict, maps: dict, begun: float) -> None:
    name = f"{args.name}_quick" if args.quick else args.name
    settings = {"mode": "quick" if args.quick else "full", "seeds": args.seeds, "budgets": budgets,
                "sensitivity_map_s": maps,
                "measure": dataclasses.asdict(MEASURE), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                "minutes": (time.time() - begun) / 60}
    table = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"settings": settings, "summary": table, "runs": runs},
                                                      indent=1, default=str))
    (args.out / f"{name}.md").write_text(markdown(table, settings))
    for task, methods in runs.items():
        plot(task, methods, args.out / f"{name}_{task}.png")
    print("\n" + markdown(table, settings), flush=True)

if __name__ == "__main__":
    main()
