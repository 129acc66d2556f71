"""The Pareto front of a study as a table, its analysis (``autocomp.analysis``), and the export of one trial's
Recipe."""

from __future__ import annotations

import json
from pathlib import Path

from autocomp import analysis
from autocomp.cache import sha256
from autocomp.errors import AutocompError
from autocomp.plot import Series
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

    teacher_of(study)  # a study `autocomp search` made, whose trials hold metrics: else one line
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


def complete_metrics(study) -> dict[int, dict[str, float]]:
    """The metrics of the study's complete trials (full fidelity, measured on their artifact), by trial number."""
    return {t.number: t.user_attrs["metrics"] for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and "metrics" in t.user_attrs}


def teacher_of(study) -> dict[str, float]:
    if "teacher" not in study.user_attrs:
        raise AutocompError(f"Study {study.study_name!r} was not made by `autocomp search` (no teacher metrics).")
    return study.user_attrs["teacher"]


def report(study, table) -> dict:
    """The study's front (``table``, its ``front_table``) and its analysis, as ``autocomp pareto --json`` prints it
    (trial numbers, not indices)."""
    teacher, trials = teacher_of(study), complete_metrics(study)
    numbers, points = list(trials), list(trials.values())
    found = analysis.summary(points, teacher)
    trial = {key: None if found[key] is None else numbers[found[key]]
             for key in ("knee", "best_size_within_1pp", "best_speedup_within_1pp")}
    return {"study": study.study_name, "objectives": study.metric_names or [], "teacher": teacher,
            "complete": found["complete"], "hypervolume": found["hypervolume"], **trial,
            "front": json.loads(table.to_json(orient="records"))}


def format_report(found: dict, trials: dict[int, dict[str, float]]) -> str:
    """The lines under the front table: hypervolume, knee, best within 1 pp of the teacher."""
    def point(key: str) -> str:
        n = found[key]
        if n is None:
            return "none"
        m = trials[n]
        return (f"trial {n} (val drop {m['val_drop_pp']:.2f} pp, {m['size_bytes'] / 1e3:.1f} KB, "
                f"{m['compression_ratio']:.2f}x smaller, {m['speedup']:.2f}x faster)")

    hv = found["hypervolume"]
    return "\n".join([
        f"hypervolume {hv['val']:.3f} on validation, {hv['test']:.3f} on test (normalised to the teacher: 1 is as "
        "accurate, half the size and twice as fast; points over 5 pp below the teacher count nothing)",
        f"knee: {point('knee')}",
        f"best size within {analysis.WITHIN_PP:g} pp: {point('best_size_within_1pp')}",
        f"best speedup within {analysis.WITHIN_PP:g} pp: {point('best_speedup_within_1pp')}"])


def compare_table(reports: list[dict], studies: list, tables: list) -> str:
    """``autocomp compare``'s table: one row per study, then each study's front (``tables``)."""
    import pandas as pd

    def within(found: dict, key: str, metric: str, trials: dict) -> str:
        n = found[key]
        return "-" if n is None else f"{trials[n][metric]:.2f}x (trial {n})"

    rows, fronts = [], []
    for found, study, front in zip(reports, studies, tables, strict=True):
        trials = complete_metrics(study)
        rows.append({"study": found["study"], "complete": found["complete"], "front": len(found["front"]),
                     "hv_val": found["hypervolume"]["val"], "hv_test": found["hypervolume"]["test"],
                     "best_size_1pp": within(found, "best_size_within_1pp", "compression_ratio", trials),
                     "best_speedup_1pp": within(found, "best_speedup_within_1pp", "speedup", trials),
                     "knee": found["knee"]})
        fronts.append(f"\n{found['study']}: " + format_table(front, found["teacher"], found["objectives"]))
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}")
    return table + "\n" + "\n".join(fronts)


def series(study, table, name: str | None = None) -> Series:
    """The study as a series of ``autocomp.plot``: its complete trials, the listed front (``table``) highlighted."""
    trials = complete_metrics(study)
    listed = set(table["trial"])
    return Series(name or study.study_name, list(trials.values()), list(trials),
                  [i for i, n in enumerate(trials) if n in listed], teacher_of(study))


def export_recipe(study, trial_number: int, path: str | Path, storage: str, artifacts: str | None = None) -> Recipe:
    """Write trial ``trial_number``'s Recipe to YAML with its provenance, and its artifact beside it (``path`` with
    the suffix ``.onnx``, its digest in the provenance) where the study's artifact folder holds it; return it."""
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
    artifact = _download_artifact(study, trial, artifacts, Path(path).with_suffix(".onnx")) if artifacts else None
    if artifact is not None:
        recipe.provenance["artifact"] = {"file": artifact.name, "sha256": sha256(artifact.read_bytes())}
    recipe.save(path)
    return recipe


def _download_artifact(study, trial, artifacts: str, out: Path) -> Path | None:
    """The trial's deployed artifact copied from the study's artifact folder to ``out``; None where it is not
    there (another machine's folder, or a study made before artifacts were stored)."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    stored = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(trial, storage=study._storage)}
    if "model.onnx" not in stored or not (Path(artifacts) / stored["model.onnx"]).exists():
        return None
    out.unlink(missing_ok=True)
    download_artifact(artifact_store=FileSystemArtifactStore(artifacts), file_path=str(out),
                      artifact_id=stored["model.onnx"])
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("autocomp", "torch", "torch-pruning", "onnxruntime", "optuna")}
