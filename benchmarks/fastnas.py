"""The peer: NVIDIA Model Optimizer's FastNAS pruning, fine-tuned and deployed exactly as autocomp's trials are.

FastNAS (``modelopt.torch.prune.prune``, mode "fastnas") turns the teacher into a search space of channel widths
(multiples of ``channel_divisor``), sorts every layer's channels by importance (the norm of the weights that read
them), and measures each width of each layer alone: validation accuracy of the subnet, BatchNorm statistics
recalibrated on 50 training batches first, no training. A binary search over the largest per-layer drop
allowed then picks the widest widths that meet the parameter cap. So FastNAS chooses its subnet by validation
score before any fine-tuning.

Each FastNAS subnet becomes an autocomp Recipe (``recipe_for``): local channel pruning of every pruning group
to FastNAS's width, logits distillation (alpha 0.7, T 4), 12 epochs of fine-tuning and static int8, all through
``autocomp.pipeline.apply``, so the peer and autocomp differ only in how the widths were found. The recipe
re-selects which channels stay by L1 norm (autocomp's ``l1`` criterion) at FastNAS's widths; FastNAS's own
channel choice is not carried over.

Needs the ``peer`` extra (``pip install -c constraints.txt -e ".[peer]"``), kept out of the core and test installs.

    python benchmarks/fastnas.py [--tasks digits] [--fractions 0.5 0.1]   # about 27 minutes for all three tasks
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from autocomp.compress.facts import teacher_facts
from autocomp.compress.prune import PrunableLayer, channels_to_remove
from autocomp.measure import with_ratios
from autocomp.pipeline import apply, teacher_baseline
from autocomp.recipe import Distill, FineTune, LayerPrune, Measure, Prune, Quantize, Recipe
from autocomp.tasks.base import Task
from autocomp.tasks.load import load_task
from autocomp.train import deterministic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FRACTIONS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03)
CALIBRATION_BATCHES = 50  # FastNAS recalibrates BatchNorm on this many batches (its max_iter_data_loader)
WITHIN_PP = 1.0
# the search benchmark's training and deployment of a uniform-grid trial (benchmarks/search_quality.py)
DISTILL = Distill(kind="logits", alpha=0.7, temperature=4.0)
FINETUNE = FineTune(epochs=12, lr=1e-3)
QUANTIZE = Quantize(bits=8, activation_bits=8, per_channel=True, calibration="minmax")


def modelopt_prune() -> ModuleType:
    """``modelopt.torch.prune``, or an ImportError that names the extra to install."""
    try:
        import modelopt.torch.prune as mtp
    except ImportError as err:
        raise ImportError(f"FastNAS needs NVIDIA Model Optimizer ({err}): pip install -c constraints.txt "
                          f"-e '.[peer]'") from err
    return mtp


def rules(channel_divisor: int) -> dict[str, dict]:
    """FastNAS's per-module-type search space: widths in steps of 5% of a layer's channels, rounded to multiples of
    ``channel_divisor`` (FastNAS's default of 32 leaves a 32-channel layer of a small CNN no choice at all)."""
    ratios = tuple(0.05 * i for i in range(1, 21))
    conv = {"channels_ratio": ratios, "kernel_size": (), "channel_divisor": channel_divisor}
    features = {"features_ratio": ratios, "feature_divisor": channel_divisor}
    return {**{f"nn.Conv{d}d": {"*": conv} for d in (1, 2, 3)},
            **{f"nn.BatchNorm{d}d": {"*": features} for d in (1, 2, 3)}, "nn.Linear": {"*": features}}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """FastNAS runs thousands of batch-of-20 forward passes: one intra-op thread beats two on a shared machine,
    where every small op of a two-thread pool waits for its descheduled partner. Deterministic, too."""
    with deterministic(threads=1):
        yield


def fastnas_subnet(task: Task, params_fraction: float, channel_divisor: int = 4,
                   checkpoint: Path | None = None) -> dict[str, int]:
    """FastNAS's subnet of ``task``'s teacher with at most ``params_fraction`` of its parameters: the kept output
    channels of each prunable layer (``teacher_facts(task).prunable``), the teacher's count where FastNAS has no
    choice for a layer.

    ``checkpoint`` keeps FastNAS's sensitivity map (one validation pass per width of each layer) for later calls
    on the same teacher and divisor, as FastNAS's own ``checkpoint`` option does.
    """
    import torch.utils.data

    if not 0.0 < params_fraction <= 1.0:
        raise ValueError(f"`params_fraction` must be in (0, 1], but got {params_fraction!r}.")
    mtp = modelopt_prune()
    floor = narrowest(task, channel_divisor)
    if params_fraction < floor:  # FastNAS itself raises with its profile table
        raise ValueError(f"FastNAS has no subnet within {100 * params_fraction:g}% of the parameters: its narrowest "
                         f"(channel divisor {channel_divisor}) keeps {100 * floor:.1f}%.")
    data = torch.utils.data.TensorDataset(task.train.x, task.train.y)
    loader = torch.utils.data.DataLoader(data, batch_size=max(1, len(data) // CALIBRATION_BATCHES))
    config = {"score_func": lambda model: task.score(model, task.val), "data_loader": loader,
              "collect_func": lambda batch: batch[0], "max_iter_data_loader": CALIBRATION_BATCHES,
              "checkpoint": None if checkpoint is None else str(checkpoint), "verbose": False}
    with one_thread(), contextlib.redirect_stdout(sys.stderr):  # FastNAS prints; the table goes to stdout
        subnet, state = mtp.prune(copy.deepcopy(task.teacher), mode=[("fastnas", rules(channel_divisor))],
                                  constraints={"params": f"{100 * params_fraction:g}%"},
                                  dummy_input=task.example_input, config=config)
    if not state["best"]["is_satisfied"]:  # its search keeps its first subnet as the best even when over the cap
        raise ValueError(f"FastNAS's subnet breaks its cap of {100 * params_fraction:g}%: {state['best']}")
    return {name: _width(subnet.get_submodule(name)) for name in teacher_facts(task).prunable}


def search_space(task: Task, channel_divisor: int):
    """A deep copy of ``task``'s teacher converted into FastNAS's search space (its widths set to the widest)."""
    modelopt_prune()
    import modelopt.torch.nas as mtn
    from modelopt.torch.prune.pruning import PruneModeRegistry

    return mtn.convert(copy.deepcopy(task.teacher), [("fastnas", rules(channel_divisor))], registry=PruneModeRegistry)


def narrowest(task: Task, channel_divisor: int) -> float:
    """The share of the teacher's parameters that FastNAS's narrowest subnet keeps, counted as FastNAS counts its
    parameter cap (on the subnet with BatchNorm folded away)."""
    from modelopt.torch.nas.utils import sample
    from modelopt.torch.utils import param_num_from_forward

    space = search_space(task, channel_divisor)
    widest = param_num_from_forward(space, args=task.example_input, unit=1.0)
    sample(space, min)
    return param_num_from_forward(space, args=task.example_input, unit=1.0) / widest


def unsearched(task: Task, channel_divisor: int) -> list[str]:
    """The teacher's pruning groups whose width FastNAS does not search (it keeps them whole): a layer whose output
    is flattened into a Linear layer, or one with a single width choice at ``channel_divisor``."""
    from modelopt.torch.opt.utils import named_hparams

    searched = {name.rpartition(".")[0] for name, _ in named_hparams(search_space(task, channel_divisor),
                                                                     configurable=True)}
    prunable = teacher_facts(task).prunable
    return [group for group in dict.fromkeys(layer.group for layer in prunable.values())
            if not any(name in searched for name, layer in prunable.items() if layer.group == group)]


def _width(layer) -> int:
    """Output channels of a Conv or features of a Linear layer, as its weight holds them."""
    return int(layer.weight.shape[1] if getattr(layer, "transposed", False) else layer.weight.shape[0])


def sparsity_for(layer: PrunableLayer, kept: int) -> float:
    """The sparsity with which autocomp's local pruning keeps exactly ``kept`` of ``layer``'s channels
    (``channels_to_remove``: round(sparsity x channels), in multiples of the group's divisor)."""
    sparsity = (layer.channels - kept) / layer.channels
    if channels_to_remove(layer.channels, sparsity, layer.divisor) != layer.channels - kept:
        raise ValueError(f"autocomp cannot keep {kept} of the {layer.channels} channels of group {layer.group!r}: "
                         f"it removes channels in multiples of {layer.divisor} and keeps at least {layer.divisor}.")
    return sparsity


def recipe_for(task: Task, kept: dict[str, int], measure: Measure, seed: int = 0) -> Recipe:
    """The autocomp Recipe that prunes ``task``'s teacher to the widths ``kept`` (layer -> kept channels), one entry
    per pruning group, and trains and deploys it as the search benchmark's uniform grid does.

    Layers tied by autocomp's groups (the two inputs of a residual add) must have one width in ``kept``.
    """
    prunable = teacher_facts(task).prunable
    widths: dict[str, int] = {}  # group -> kept channels
    for name, layer in prunable.items():
        if widths.setdefault(layer.group, kept[name]) != kept[name]:
            raise ValueError(f"layer {name!r} keeps {kept[name]} channels but its group {layer.group!r} keeps "
                             f"{widths[layer.group]}: FastNAS does not tie the layers autocomp ties.")
    layers = {group: LayerPrune(sparsity_for(prunable[group], width), "l1") for group, width in widths.items()
              if width < prunable[group].channels}
    return Recipe(task=task.name, prune=Prune(scope="local", layers=layers), quantize=QUANTIZE, distill=DISTILL,
                  finetune=FINETUNE, measure=measure, seed=seed, provenance={"peer": "fastnas", "widths": widths})


def run(task_name: str, fractions: list[float], out_dir: Path, measure: Measure, seed: int = 0,
        channel_divisor: int = 4) -> list[dict]:
    """For each parameter fraction: FastNAS's subnet, its recipe applied by autocomp, the artifact's metrics
    against the teacher's (timed side by side). A fraction FastNAS cannot meet is recorded with its reason."""
    task = load_task(task_name)
    out_dir = Path(out_dir)
    baseline = teacher_baseline(task, measure, out_dir / task_name / "teacher")
    checkpoint = out_dir / task_name / f"fastnas-divisor{channel_divisor}.pth"
    rows = []
    for fraction in fractions:
        started = time.perf_counter()
        try:
            kept = fastnas_subnet(task, fraction, channel_divisor, checkpoint)
            recipe = recipe_for(task, kept, measure, seed)
        except Exception as err:  # noqa: BLE001 - whatever FastNAS cannot do is a result, not a crash
            rows.append({"fraction": fraction, "error": f"{type(err).__name__}: {err}",
                         "fastnas_s": round(time.perf_counter() - started, 1)})
            print(f"   {task_name} {fraction:g}: {rows[-1]['error']}", flush=True)
            continue
        searched = time.perf_counter()
        result = apply(recipe, task, out_dir / task_name / f"params{fraction:g}", progress=False,
                       reference=baseline.artifact)
        metrics = with_ratios(result.metrics, baseline.metrics)
        rows.append({"fraction": fraction, "kept": kept, "params_kept": metrics["params"] / baseline.metrics["params"],
                     "metrics": metrics, "fastnas_s": round(searched - started, 1),
                     "apply_s": round(time.perf_counter() - searched, 1)})
        print(f"   {task_name} {fraction:g}: {line(rows[-1])}", flush=True)
    return rows


def line(row: dict) -> str:
    m = row["metrics"]
    return (f"params {100 * row['params_kept']:.1f}%, val {100 * m['val_accuracy']:.2f}% "
            f"({-m['val_drop_pp']:+.2f} pp), test {100 * m['test_accuracy']:.2f}%, size {m['compression_ratio']:.1f}x, "
            f"speedup {m['speedup']:.2f}x; FastNAS {row['fastnas_s']:.0f} s, apply {row['apply_s']:.0f} s")


def best_within(rows: list[dict], metric: str) -> dict | None:
    """The row with the best ``metric`` among those within 1.0 pp of the teacher on validation."""
    near = [r for r in rows if "metrics" in r and r["metrics"]["val_drop_pp"] <= WITHIN_PP]
    return max(near, key=lambda r: r["metrics"][metric]) if near else None


def markdown(results: dict[str, list[dict]], settings: dict) -> str:
    lines = ["# FastNAS (NVIDIA Model Optimizer) as the peer", "",
             f"FastNAS picks widths under a parameter cap (channel divisor {settings['channel_divisor']}); autocomp "
             f"fine-tunes them (logits KD, {FINETUNE.epochs} epochs) and deploys static int8. Measurement "
             f"{settings['measure']}; {settings['machine']}; modelopt {settings['modelopt']}; "
             f"minutes per task {settings['task_minutes']}. Chosen on validation, reported on test. FastNAS s: the "
             "first cap's includes FastNAS's sensitivity map (a validation pass per width of each layer), which the "
             "later caps reload from FastNAS's checkpoint.", ""]
    for task, rows in results.items():
        fixed = settings["unsearched"].get(task)
        lines += [f"## {task}", "", f"Groups FastNAS does not search (kept whole): {fixed or 'none'}.", "",
                  "| params cap | params kept | val acc | test acc | size ratio | speedup | "
                  "FastNAS s | apply s |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {100 * r['fraction']:g}% | not run: {r['error']} | | | | | {r['fastnas_s']:.0f} | |")
                continue
            m = r["metrics"]
            lines.append(f"| {100 * r['fraction']:g}% | {100 * r['params_kept']:.1f}% | {100 * m['val_accuracy']:.2f} "
                         f"| {100 * m['test_accuracy']:.2f} | {m['compression_ratio']:.1f}x | {m['speedup']:.2f}x | "
                         f"{r['fastnas_s']:.0f} | {r['apply_s']:.0f} |")
        for metric, label in (("compression_ratio", "size ratio"), ("speedup", "speedup")):
            best = best_within(rows, metric)
            lines += ["", f"Best {label} within {WITHIN_PP} pp of the teacher on validation: " + (
                "none" if best is None else f"{best['metrics'][metric]:.2f}x at a {100 * best['fraction']:g}% cap "
                f"(test drop {best['metrics']['test_drop_pp']:.2f} pp).")]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from search_quality import MEASURE  # the search benchmark's protocol, so the two compare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d", "mnist1d_lean"])
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--channel-divisor", type=int, default=4, help="FastNAS's width step (default 4: "
                        "mnist1d_lean's 25-channel layers get 7 widths; 8 would leave 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    try:
        modelopt_prune()
    except ImportError as err:
        sys.exit(str(err))
    import modelopt

    settings = {"measure": dataclasses.asdict(MEASURE), "channel_divisor": args.channel_divisor, "seed": args.seed,
                "machine": f"{os.cpu_count()} cores, {platform.machine()}", "modelopt": modelopt.__version__,
                "task_minutes": {}, "unsearched": {}}
    begun, results = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            print(f"\n== {task}", flush=True)
            started = time.time()
            settings["unsearched"][task] = unsearched(load_task(task), args.channel_divisor)
            results[task] = run(task, args.fractions, Path(tmp), MEASURE, args.seed, args.channel_divisor)
            settings["task_minutes"][task] = round((time.time() - started) / 60, 1)
            settings["minutes"] = (time.time() - begun) / 60
            text = write(results, settings, args.out)  # after every task: an interrupted run keeps what it measured
    print("\n" + text, flush=True)


def write(results: dict[str, list[dict]], settings: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fastnas.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1, default=str))
    text = markdown(results, settings)
    (out / "fastnas.md").write_text(text)
    return text

if __name__ == "__main__":
    main()
