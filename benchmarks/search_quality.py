"""Does the search beat the hand-made pipeline at the budget a user spends? Methods side by side, on test.

For each task, seed and method one fresh study runs through ``autocomp.search.optuna_runner.run_search`` (the path
``autocomp search`` takes), on the task's shipped study (``studies/TASK.yaml``: objectives, sampler settings) and
one measurement protocol for all:

- ``uniform``: the hand-made grid, every group pruned to one level by L1, logits distillation (alpha 0.7, T 4), the
  full fine-tune (12 epochs, stopped once validation accuracy stalls for 3), deployed fp32, static int8
  and 4-bit weights trained with QAT; levels from coarse to fine (0.5, 0.8, 0.65, 0.9, 0.35, 0.95, ...), as many
  as the budget holds;
- ``autocomp``: the shipped study as it is: the compact space (``search_spaces/compact.yaml``) with its warm start
  (students included) and the proxy-guided sampler (``autocomp.search.proxy_sampler``);
- ``gp``, ``tpe``, ``nsga2``, ``random``: the compact space with its warm start and Optuna's sampler, no screening
  (which sampler learns the compact space in tens of trials);
- ``no_students``: ``autocomp`` without the student choice (``make bench-students``);
- ``fastnas``: the peer, NVIDIA Model Optimizer's FastNAS (``benchmarks/fastnas.py``, the ``peer`` extra) at
  parameter caps of 50% down to 3%, each subnet fine-tuned and deployed (static int8) by autocomp's ``apply``.

Every study method gets the same wall-clock budget per task (``BUDGETS``, or ``--budget`` seconds), counted from
the start of its run (the teacher's baseline included): it starts trials until then, and the trial running then
finishes. FastNAS runs its sweep whatever it takes (its time is reported). The teacher's sensitivity map is
analysed once per task before the runs, as ``autocomp sensitivity`` or a first study would. Trials are chosen on
validation and reported on test:

- **hypervolume** of the validation front's test points, in a space normalised to the teacher: accuracy as
  (test accuracy - teacher's + 5 pp) / 5 pp (the teacher at 1, five points worse at 0), log2 of the size
  ratio and log2 of the speedup, both 0 at the teacher; reference point (0, 0, 0), so a point counts only
  where it is smaller, faster and within 5 pp of the teacher (``autocomp.analysis``, which ``autocomp pareto``
  and ``compare`` report);
- **best size ratio** and **best speedup** among trials within 1.0 pp of the teacher on validation, with
  their test drop;
- **time to 90%** of the run's final hypervolume, from the start of the run;
- **overhead**: the share of the run's wall-clock time spent outside ``apply`` (sampling, the cheap rung, storage,
  the teacher's baseline), and measurement's share (accuracy and latency of artifacts).

    .venv/bin/python benchmarks/search_quality.py            # the full suite, about 1.5 hours here
    .venv/bin/python benchmarks/search_quality.py --quick    # digits, uniform against autocomp, about 10 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from autocomp import analysis, sensitivity
from autocomp.config import read_yaml, write_yaml
from autocomp.recipe import Measure
from autocomp.search.optuna_runner import run_search
from autocomp.study import StudySpec
from autocomp.tasks.load import load_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("uniform", "autocomp", "gp", "tpe", "nsga2", "random", "no_students", "fastnas")
DEFAULT_METHODS = ["uniform", "autocomp", "fastnas"]
COMPACT = ROOT / "search_spaces" / "compact.yaml"
GRID_LEVELS = [0.5, 0.8, 0.65, 0.9, 0.35, 0.95, 0.7, 0.85, 0.6, 0.75, 0.2, 0.55, 0.45]  # coarse to fine
GRID_FORMATS = ["fp32", "int8", "int4"]
GRID_EPOCHS = 12  # a pruned teacher's full fine-tune, stopped once validation accuracy stalls for 3 (the space's)
BUDGETS = {"digits": 480.0, "mnist1d": 900.0, "mnist1d_lean": 360.0}  # seconds per run: what a user spends
FASTNAS_CAPS = [0.5, 0.3, 0.2, 0.1, 0.05, 0.03]
# one protocol for every method, cheaper than a study's (at least 1 s of rounds, not 5): ratios are compared
MEASURE = Measure(warmup_seconds=0.5, tolerance=0.03, min_seconds=1.0, max_seconds=3.0)
WITHIN_PP = analysis.WITHIN_PP
TARGETS = {"size_vs_uniform": 1.5, "speedup_vs_uniform": 1.3, "hv_vs_uniform": 1.15, "hv_vs_fastnas": 1.0}
SIZE_FLOOR = {"mnist1d_lean": 2.0}  # a task whose target is a point this much smaller than the teacher within 1 pp


def method_spec(base: StudySpec, method: str, seed: int, folder: Path) -> StudySpec:
    """The study one method runs: the shipped study, its space and sampler changed as the method says."""
    compact = method in ("uniform", "gp", "tpe", "nsga2", "random")
    space = read_yaml(COMPACT if compact else base.space, "search space")
    spec = dataclasses.replace(base, study_name=f"{base.study_name}-{method}-{seed}", seed=seed, measure=MEASURE,
                               storage=f"sqlite:///{folder / 'studies.db'}",
                               artifacts=str(folder / f"{base.study_name}-{method}-{seed}"))
    if method == "uniform":
        space["warm_start"] = {"levels": GRID_LEVELS, "sensitivity": False, "formats": GRID_FORMATS}
        space["finetune"] = {**space["finetune"], "epochs": GRID_EPOCHS}
        spec = dataclasses.replace(spec, sampler="random", screening=None,
                                   trials=len(GRID_FORMATS) * len(GRID_LEVELS))
    elif method == "no_students":
        space.pop("student", None)
    elif compact:
        spec = dataclasses.replace(spec, sampler=method, screening=None)
    path = folder / f"{spec.study_name}.space.yaml"
    write_yaml(space, path)
    return dataclasses.replace(spec, space=str(path))


def val_front(points: list[dict]) -> list[dict]:
    """The points no other beats on validation accuracy, size and latency (as the study ranks them)."""
    return [points[i] for i in analysis.front([p["metrics"] for p in points])]


def hypervolume(points: list[dict], teacher: dict) -> float:
    """The hypervolume of the validation front's test points, normalised to the teacher (``autocomp.analysis``)."""
    return analysis.hypervolume([p["metrics"] for p in points], teacher)


def best_within(points: list[dict], metric: str) -> dict:
    """The point with the best ``metric`` among those within 1.0 pp of the teacher on validation."""
    best = analysis.best_within([p["metrics"] for p in points], metric, WITHIN_PP)
    if best is None:
        return {"value": 1.0, "test_drop_pp": 0.0, "trial": None}
    m = points[best]["metrics"]
    return {"value": m[metric], "test_drop_pp": m["test_drop_pp"], "val_drop_pp": m["val_drop_pp"],
            "trial": points[best]["trial"]}


def evaluate(points: list[dict], teacher: dict, started: float, wall: float, stages: dict[str, float],
             states: list[str]) -> dict:
    """The run's numbers (module docstring) from its full-fidelity points (``trial``, ``metrics``, ``done``)."""
    points = sorted(points, key=lambda p: p["done"])
    final = hypervolume(points, teacher)
    reached = next((p["done"] - started for i, p in enumerate(points)
                    if hypervolume(points[: i + 1], teacher) >= 0.9 * final), None) if final else None
    return {
        "trials": len(states), "complete": states.count("COMPLETE"), "screened_out": states.count("PRUNED"),
        "failed": states.count("FAIL"), "wall_s": wall, "hypervolume": final, "time_to_90_s": reached,
        "best_size": best_within(points, "compression_ratio"), "best_speedup": best_within(points, "speedup"),
        "overhead": (wall - sum(stages.values())) / wall, "measure_share": stages.get("measure", 0.0) / wall,
        "export_share": stages.get("deploy", 0.0) / wall,
        "front": [{"trial": p["trial"], **{k: p["metrics"][k] for k in
                                           ("val_accuracy", "test_accuracy", "compression_ratio", "speedup")}}
                  for p in val_front(points)],
        "teacher": {k: teacher[k] for k in ("val_accuracy", "test_accuracy", "size_bytes", "latency_ms")},
    }


def run_study(task: str, method: str, seed: int, budget: float, folder: Path) -> dict:
    spec = method_spec(StudySpec.load(ROOT / "studies" / f"{task}.yaml"), method, seed, folder)
    started = time.time()
    study, _ = run_search(spec, trials=spec.trials if method == "uniform" else 10**6, seed=seed, timeout=budget,
                          progress=False)
    wall = time.time() - started
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    points = [{"trial": t.number, "metrics": t.user_attrs["metrics"], "done": t.datetime_complete.timestamp()}
              for t in done]
    stages = {stage: sum(s.get(stage, 0.0) for t in study.trials
                         for s in (t.user_attrs.get("seconds", {}), t.user_attrs.get("screen", {}).get("seconds", {})))
              for stage in ("compress", "deploy", "measure")}
    result = evaluate(points, study.user_attrs["teacher"], started, wall, stages, [t.state.name for t in study.trials])
    return {**result, "proxy_tau": proxy_tau(study.trials)}


def proxy_tau(trials: list) -> dict:
    """Kendall's tau of the cheap rung (``proxy`` user attribute) against the full trial, over a run's complete
    trials that hold both: validation accuracy, size and latency (MACs where the proxy predicted none)."""
    from scipy.stats import kendalltau

    pairs = [(t.user_attrs["proxy"], t.user_attrs["metrics"]) for t in trials
             if t.state.name == "COMPLETE" and "proxy" in t.user_attrs]
    if len(pairs) < 3:
        return {"n": len(pairs)}
    speed = "latency_ms" if all(p["latency_ms"] is not None for p, _ in pairs) else "macs"
    tau = {name: float(kendalltau([p[key] for p, _ in pairs], [m[full] for _, m in pairs]).statistic)
           for name, key, full in (("accuracy", "val_accuracy", "val_accuracy"), ("size", "size_bytes", "size_bytes"),
                                   ("latency", speed, "latency_ms"))}
    return {"n": len(pairs), "latency_from": speed, **tau}


def run_fastnas(task: str, seed: int, folder: Path) -> dict:
    """The peer's sweep of parameter caps (``benchmarks/fastnas.py``), evaluated as a run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fastnas

    started = time.time()
    rows = fastnas.run(task, FASTNAS_CAPS, folder / f"fastnas-{task}-{seed}", MEASURE, seed=seed)
    wall = time.time() - started
    points, clock = [], started
    for row in rows:
        clock += row.get("fastnas_s", 0.0) + row.get("apply_s", 0.0)
        if "metrics" in row:
            points.append({"trial": f"cap {row['fraction']:g}", "metrics": row["metrics"], "done": clock})
    teacher = rows_teacher(rows)
    stages = {"compress": sum(r.get("apply_s", 0.0) for r in rows)}
    result = evaluate(points, teacher, started, wall, stages, ["COMPLETE" if "metrics" in r else "FAIL" for r in rows])
    result["fastnas_s"] = sum(r.get("fastnas_s", 0.0) for r in rows)
    return result


def rows_teacher(rows: list[dict]) -> dict:
    """The teacher's metrics, from any measured row (``with_ratios`` keeps what it was compared with)."""
    m = next(r["metrics"] for r in rows if "metrics" in r)
    return {"val_accuracy": m["val_accuracy"] + m["val_drop_pp"] / 100, "test_accuracy":
            m["test_accuracy"] + m["test_drop_pp"] / 100, "size_bytes": m["size_bytes"] * m["compression_ratio"],
            "latency_ms": m["latency_ms"] * m["speedup"]}


def run(task: str, method: str, seed: int, budget: float, folder: Path) -> dict | None:
    try:
        result = run_fastnas(task, seed, folder) if method == "fastnas" else run_study(task, method, seed, budget,
                                                                                       folder)
    except ImportError as err:  # the peer's extra is not installed: a run it cannot make, said once
        tqdm.write(f"   {task} / {method}: skipped, {err}")
        return None
    tqdm.write(f"   {task} / {method} / seed {seed}: {result['complete']} complete, {result['screened_out']} "
               f"screened out or duplicates, {result['failed']} failed; hypervolume {result['hypervolume']:.3f}; "
               f"best size {result['best_size']['value']:.1f}x, speedup {result['best_speedup']['value']:.2f}x; "
               f"{result['wall_s']:.0f} s")
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
        mean = {m: {k: v["mean"] for k, v in rows[m].items()} for m in rows}
        if {"autocomp", "uniform"} <= set(rows):
            vs = {"size_vs_uniform": mean["autocomp"]["best_size"] / mean["uniform"]["best_size"],
                  "speedup_vs_uniform": mean["autocomp"]["best_speedup"] / mean["uniform"]["best_speedup"],
                  "hv_vs_uniform": mean["autocomp"]["hypervolume"] / max(mean["uniform"]["hypervolume"], 1e-9)}
            if "fastnas" in rows and mean["fastnas"]["hypervolume"] > 0:  # else FastNAS has no point that counts
                vs["hv_vs_fastnas"] = mean["autocomp"]["hypervolume"] / mean["fastnas"]["hypervolume"]
            table[task]["vs_autocomp"] = vs
        if task in SIZE_FLOOR and methods.get("autocomp"):
            table[task]["size_floor"] = [r["best_size"]["value"] for r in methods["autocomp"]]
        taus = [r["proxy_tau"] for r in methods.get("autocomp", []) if r.get("proxy_tau", {}).get("n", 0) >= 3]
        if taus:
            table[task]["proxy_tau"] = taus
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
            if method not in rows or method.startswith("vs_"):
                continue
            r = rows[method]

            def f(key: str, fmt: str = ".2f", scale: float = 1.0, r: dict = r) -> str:
                m = r[key]["mean"]
                return "-" if m is None else f"{scale * m:{fmt}} +- {scale * r[key]['sd']:{fmt}}"

            lines.append(f"| {method} | {f('complete', '.1f')} | {f('hypervolume', '.3f')} | {f('best_size', '.1f')}x "
                         f"({f('size_test_drop_pp')} pp) | {f('best_speedup')}x ({f('speedup_test_drop_pp')} pp) | "
                         f"{f('time_to_90_s', '.0f')} | {f('overhead', '.1f', 100)}% | "
                         f"{f('measure_share', '.1f', 100)}% |")
        vs = rows.get("vs_autocomp")
        if "size_floor" in rows:
            sizes = rows["size_floor"]
            ok = "met" if min(sizes) >= SIZE_FLOOR[task] else "missed by a seed"
            lines += ["", "| target (autocomp) | wanted | measured (each seed) |", "|---|---|---|",
                      f"| size within 1 pp against the teacher | >= {SIZE_FLOOR[task]}x | "
                      f"{', '.join(f'{v:.1f}x' for v in sizes)} {ok} |"]
        elif vs:
            lines += ["", "| target (autocomp) | wanted | measured |", "|---|---|---|"]
            for key, wanted in TARGETS.items():
                if key in vs:
                    ok = "met" if vs[key] >= wanted else "missed"
                    lines.append(f"| {key.replace('_', ' ')} | >= {wanted}x | {vs[key]:.2f}x {ok} |")
        if "proxy_tau" in rows:
            per = "; ".join(f"run {i}: accuracy {t['accuracy']:.2f}, size {t['size']:.2f}, latency {t['latency']:.2f} "
                            f"(from {t['latency_from']}), {t['n']} trials" for i, t in enumerate(rows["proxy_tau"], 1))
            lines += ["", f"The cheap rung against autocomp's full trials, Kendall's tau: {per}."]
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
    parser.add_argument("--quick", action="store_true", help="digits, one seed, uniform against autocomp, 5 min each")
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "mnist1d_lean"])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", type=float, help="seconds per run (default: BUDGETS)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="search_quality", help="results file name (a subset of methods)")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.methods, args.budget = ["digits"], [0], ["uniform", "autocomp"], 300.0
    budgets: dict = {}
    maps: dict = {}  # task -> seconds its sensitivity map took, once
    begun = time.time()
    runs: dict = {}
    count = len(args.tasks) * sum(1 if m in ("uniform", "fastnas") else len(args.seeds) for m in args.methods)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=count, unit="run") as bar:
        for task in args.tasks:
            runs[task] = {m: [] for m in args.methods}
            budgets[task] = args.budget or BUDGETS[task]
            started = time.time()
            sensitivity.cached(load_task(task), recompute=True)
            maps[task] = round(time.time() - started, 1)
            for seed in args.seeds:
                for method in args.methods:
                    if method in ("uniform", "fastnas") and seed != args.seeds[0]:
                        continue  # deterministic: a grid or a sweep is the same at every seed
                    bar.set_description(f"{task} / {method} / seed {seed}")
                    result = run(task, method, seed, budgets[task], Path(tmp))
                    if result is not None:
                        runs[task][method].append(result)
                    bar.update()
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
