"""The Pareto front of a study as a table, and the export of one trial's Recipe."""

from __future__ import annotations

from pathlib import Path

from autocomp.errors import AutocompError
from autocomp.recipe import Recipe

COLUMNS = {  # column -> (metric key, scale)
    "val_%": ("val_accuracy", 100.0),
    "test_%": ("test_accuracy", 100.0),
    "test_drop_pp": ("test_drop_pp", 1.0),
    "size_kb": ("size_bytes", 1e-3),
    "ratio_x": ("compression_ratio", 1.0),
    "latency_ms": ("latency_ms", 1.0),
    "speedup_x": ("speedup", 1.0),
    "macs_m": ("macs", 1e-6),
}


def front_table(study):
    """The Pareto-optimal completed trials as a DataFrame, best validation accuracy first.

    ``noisy`` marks trials whose latency did not settle within the measurement budget.
    """
    import pandas as pd

    rows = []
    for trial in study.best_trials:
        metrics, recipe = trial.user_attrs["metrics"], trial.user_attrs["recipe"]
        row = {"trial": trial.number}
        row |= {column: metrics[key] * scale for column, (key, scale) in COLUMNS.items()}
        quantize = recipe["quantize"]
        row["bits"] = "mixed" if quantize.get("layers") else quantize["bits"]  # per-layer widths: see the recipe
        row["noisy"] = "yes" if metrics["latency_noisy"] else ""
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", *COLUMNS, "bits", "noisy"])
    return table.sort_values(["val_%", "size_kb"], ascending=[False, True]).reset_index(drop=True)


def format_table(table, teacher: dict[str, float], objectives: list[str]) -> str:
    """A fixed-width text table, headed by the teacher's own measurements and what the front was chosen on."""
    head = (f"teacher: val {100 * teacher['val_accuracy']:.2f}%, test {100 * teacher['test_accuracy']:.2f}%, "
            f"size {teacher['size_bytes'] / 1e3:.1f} KB, latency {teacher['latency_ms']:.4f} ms, "
            f"{teacher['macs'] / 1e6:.2f} M MACs")
    chosen = (f"Pareto front on {', '.join(objectives)}: {len(table)} trial(s), chosen on the validation split; "
              f"test accuracy is reported only")
    body = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return f"{head}\n{chosen}\n{body}"


def export_recipe(study, trial_number: int, path: str | Path, storage: str) -> Recipe:
    """Write trial ``trial_number``'s Recipe to YAML with its provenance; return it."""
    trials = {t.number: t for t in study.trials}
    trial = trials.get(trial_number)
    if trial is None or trial.state.name != "COMPLETE" or "recipe" not in trial.user_attrs:
        complete = [t.number for t in study.trials if t.state.name == "COMPLETE"]
        state = "does not exist" if trial is None else f"is {trial.state.name}"
        raise AutocompError(f"`--trial` must name a completed trial of study {study.study_name!r} "
                            f"{complete}, but trial {trial_number} {state}.")
    recipe = Recipe.from_dict(trial.user_attrs["recipe"])
    recipe.provenance = {
        "study": study.study_name, "storage": storage, "trial": trial.number, "task": recipe.task,
        "fingerprint": study.user_attrs.get("fingerprint", {}), "teacher": study.user_attrs["teacher"],
        "metrics": trial.user_attrs["metrics"], "versions": versions(),
    }
    recipe.save(path)
    return recipe


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("autocomp", "torch", "torch-pruning", "onnxruntime", "optuna")}
