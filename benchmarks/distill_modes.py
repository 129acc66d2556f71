"""What each distillation mode does on MNIST-1D, and lottery-ticket rewinding against fine-tuning.

Every row is one recipe through ``autocomp.pipeline.apply`` (the path of search trials and ``autocomp apply``),
its accuracy measured on the deployed fp32 artifact: validation and test, per seed and as the mean of the seeds.

- **Modes**: a from-scratch CNN student of one fixed architecture per width (``WIDTHS``: a tiny one and a
  wider one), the same epochs, learning rate, temperature and alpha for every mode; the teacher is ``mnist1d``'s
  CNN; multi-teacher adds the ``mnist1d_transformer`` teacher; born-again runs 2 generations; the assistant is the
  default (the teacher's graph at half width from its kept weights, distilled for 10 epochs, cached); "no KD" is
  cross-entropy alone.
- **Rewinding**: the teacher itself, 80% (and 95%) of its weights pruned by global magnitude, then retrained for
  the same epochs from its kept weights as trained (fine-tuning) or rewound to its early checkpoint
  (``REWIND_SHARE`` of its training), cross-entropy alone.

    python benchmarks/distill_modes.py [--seeds 0 1] [--epochs 30]   # about 11 minutes here (with the teachers cached)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from autocomp.pipeline import apply
from autocomp.recipe import Distill, FineTune, Measure, Prune, Recipe, Student
from autocomp.tasks.base import REWIND_SHARE
from autocomp.tasks.load import load_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIDTHS = ("16,32", "64,128")  # the students' channels per stage: a tiny student and a wider one
MEASURE = Measure(warmup_seconds=0.0, tolerance=0.5, max_seconds=0.1, min_seconds=0.0, sessions=1, rounds=3)
ALPHA, TEMPERATURE = 0.7, 4.0
MODES = {  # row -> its distill section
    "no KD": Distill(kind="none"),
    "offline KD": Distill(mode="offline"),
    "mutual (1 peer)": Distill(mode="mutual", peers=1),
    "assistant (teacher at half width)": Distill(mode="assistant"),
    "multi-teacher (CNN + transformer)": Distill(mode="multi_teacher", teachers=["mnist1d_transformer"]),
    "born-again (2 generations)": Distill(mode="born_again", generations=2),
    "self": Distill(mode="self"),
}
SPARSITIES = (0.8, 0.95)


def student(width: str) -> Student:
    """A from-scratch 1-D CNN of two stages of one block each, ``width`` channels per stage ("16,32")."""
    return Student("cnn", {"depth": [1, 1], "width": [int(w) for w in width.split(",")], "kernel": 5, "head": "avg"})


def mode_recipe(distill: Distill, width: str, epochs: int, seed: int) -> Recipe:
    return Recipe(task="mnist1d", student=student(width), seed=seed, measure=MEASURE,
                  finetune=FineTune(epochs=epochs, lr=5e-3),
                  distill=dataclasses.replace(distill, alpha=ALPHA, temperature=TEMPERATURE))


def rewind_recipe(sparsity: float, init: str, epochs: int, seed: int) -> Recipe:
    return Recipe(task="mnist1d", seed=seed, measure=MEASURE, distill=Distill(kind="none"),
                  prune=Prune(scope="global", granularity="weight", sparsity=sparsity, criterion="l1", init=init),
                  finetune=FineTune(epochs=epochs, lr=2e-3))


def run(rows: dict[str, Callable[[int], Recipe]], seeds: list[int], task, out: Path) -> list[dict]:
    results = []
    for name, make in rows.items():
        for seed in seeds:
            started = time.perf_counter()
            result = apply(make(seed), task, out / f"{len(results)}", progress=False)
            results.append({"row": name, "seed": seed, "val_accuracy": result.metrics["val_accuracy"],
                            "test_accuracy": result.metrics["test_accuracy"], "params": result.metrics["params"],
                            "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name:<48} seed {seed}: test {result.metrics['test_accuracy']:.4f}, "
                  f"val {result.metrics['val_accuracy']:.4f} ({results[-1]['seconds']} s)", flush=True)
    return results


def table(results: list[dict], title: str) -> list[str]:
    lines = [f"| {title} | test accuracy (mean) | per seed | val accuracy (mean) | params | seconds a run |",
             "|---|---:|---|---:|---:|---:|"]
    for row in dict.fromkeys(r["row"] for r in results):
        mine = [r for r in results if r["row"] == row]
        test = [r["test_accuracy"] for r in mine]
        lines.append(f"| {row.partition(': ')[2] or row} | {100 * statistics.mean(test):.2f}% | "
                     f"{', '.join(f'{100 * t:.2f}' for t in test)} | "
                     f"{100 * statistics.mean(r['val_accuracy'] for r in mine):.2f}% | {mine[0]['params']:,} | "
                     f"{statistics.mean(r['seconds'] for r in mine):.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30, help="every student's epochs (default 30)")
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), help="students' channels per stage (16,32)")
    parser.add_argument("--rewind-epochs", type=int, default=15, help="retraining after pruning (default 15)")
    parser.add_argument("--name", default="distill_modes")
    args = parser.parse_args()
    task = load_task("mnist1d")
    transformer = load_task("mnist1d_transformer")
    teachers = {name: {"val": t.score(t.teacher, t.val), "test": t.score(t.teacher, t.test)}
                for name, t in (("mnist1d", task), ("mnist1d_transformer", transformer))}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        modes = run({f"width {width}: {name}": (lambda seed, d=d, width=width: mode_recipe(d, width, args.epochs, seed))
                     for width in args.widths for name, d in MODES.items()}, args.seeds, task, Path(tmp))
        rewinding = run({f"{sparsity:.0%} of weights pruned, {init}": (
            lambda seed, sparsity=sparsity, init=init: rewind_recipe(sparsity, init, args.rewind_epochs, seed))
            for sparsity in SPARSITIES for init in ("trained", "rewind")}, args.seeds, task, Path(tmp))
    when = time.strftime("%Y-%m-%d", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({
        "date": when, "machine": platform.processor() or platform.machine(), "seeds": args.seeds,
        "epochs": args.epochs, "rewind_epochs": args.rewind_epochs,
        "students": {width: student(width).config for width in args.widths},
        "alpha": ALPHA, "temperature": TEMPERATURE, "rewind_share": REWIND_SHARE, "teachers": teachers,
        "modes": modes, "rewinding": rewinding, "minutes": round((time.time() - started) / 60, 1)}, indent=2))
    teacher_line = ", ".join(f"{name} {100 * t['test']:.2f}%" for name, t in teachers.items())
    lines = [f"# Distillation modes and rewinding on MNIST-1D ({when})", "",
             f"`python benchmarks/distill_modes.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}` "
             f"({(time.time() - started) / 60:.0f} minutes). Teachers' test accuracy: {teacher_line}.", "",
             f"Students: `cnn`, two stages of one block each (kernel 5, average-pooled head), the width's channels per "
             f"stage, from scratch, {args.epochs} epochs at lr 5e-3, alpha {ALPHA}, T {TEMPERATURE}; accuracy of the "
             f"deployed fp32 artifact.", "",
             *(line for width in args.widths for line in [
                 *table([r for r in modes if r["row"].startswith(f"width {width}:")], f"mode (width {width})"), ""]),
             f"Rewinding: the `mnist1d` teacher, {' or '.join(f'{s:.0%}' for s in SPARSITIES)} of its weights pruned "
             f"(global magnitude), retrained "
             f"{args.rewind_epochs} epochs at lr 2e-3 with cross-entropy, from its kept weights as trained or rewound "
             f"to its checkpoint after {REWIND_SHARE:.0%} of its training.", "",
             *table(rewinding, "pruned teacher"), ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
