"""What optuna-dashboard shows of a study: each trial's numbers as flat scalar user attributes (sortable columns,
axes of its Pareto plot), and Markdown notes through its note API (``optuna_dashboard.save_note``): a trial's
recipe in a few lines with its numbers against the teacher, and the study's teacher, task, space and run."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from autocomp.recipe import Recipe

if TYPE_CHECKING:
    import optuna

Metrics = dict[str, float]


def feasible(metrics: Metrics, constraints: dict[str, float]) -> bool:
    """Within every cap of the study (``constraints``: metric -> the most a feasible trial may have)."""
    return all(metrics[metric] <= cap for metric, cap in constraints.items())


def flat(metrics: Metrics, recipe: Recipe, constraints: dict[str, float]) -> dict[str, float | int | str]:
    """A trial's numbers as scalar user attributes: numbers sort in the dashboard (flags are 0 or 1)."""
    return {
        "val_accuracy_pct": round(100 * metrics["val_accuracy"], 3),
        "test_accuracy_pct": round(100 * metrics["test_accuracy"], 3),
        "val_drop_pp": round(metrics["val_drop_pp"], 3), "test_drop_pp": round(metrics["test_drop_pp"], 3),
        "size_kb": round(metrics["size_bytes"] / 1e3, 3), "compression_x": round(metrics["compression_ratio"], 3),
        "latency_ms": round(metrics["latency_ms"], 5), "speedup_x": round(metrics["speedup"], 3),
        "latency_noisy": int(bool(metrics["latency_noisy"])),
        "macs_m": round(metrics["macs"] / 1e6, 4), "params": int(metrics["params"]),
        "student": recipe.student.family, "feasible": int(feasible(metrics, constraints)),
    }


def describe(recipe: Recipe) -> list[str]:
    """What ``recipe`` does, a sentence each: student, pruning per group, quantization, distillation, fine-tune."""
    return [_student(recipe), _prune(recipe), _quantize(recipe),
            f"Distils {recipe.distill.kind} (T {recipe.distill.temperature:g}, alpha {recipe.distill.alpha:g}) and "
            f"fine-tunes up to {recipe.finetune.epochs} epochs at lr {recipe.finetune.lr:g}."]


def _student(recipe: Recipe) -> str:
    student = recipe.student
    if student.family == "teacher":
        return "The teacher's own architecture."
    config = ", ".join(f"{k} {v}" for k, v in sorted(student.config.items()))
    return f"A {student.family} student ({config}{', ' if config else ''}from {student.init or 'its default init'})."


def _prune(recipe: Recipe) -> str:
    prune = recipe.prune
    parts = [f"{name} {lp.sparsity:.2f} {lp.criterion}" for name, lp in prune.layers.items() if lp.sparsity > 0]
    if not parts and prune.sparsity > 0:
        parts = [f"{prune.sparsity:.2f} of all {prune.granularity}s {prune.criterion}"]  # global scope: one level
    said = f"Prunes {prune.granularity}s ({prune.scope}): {', '.join(parts)}" if parts else "No pruning"
    extra = [f"drops {prune.drop_blocks} residual block(s)" if prune.drop_blocks else "",
             f"removes {prune.heads:.0%} of attention heads" if prune.heads else "",
             f"in {prune.rounds} rounds" if prune.rounds > 1 else ""]
    return "; ".join([said, *filter(None, extra)]) + "."


def _quantize(recipe: Recipe) -> str:
    q = recipe.quantize
    weights = "fp32 weights" if q.bits >= 32 else f"{q.bits}-bit weights"
    if q.layers:
        weights += " (per layer: " + ", ".join(f"{layer} {bits}" for layer, bits in q.layers.items()) + ")"
    acts = "int8 activations on ONNX Runtime's int8 kernels" if q.activation_bits == 8 else "fp32 activations"
    how = [("per-channel" if q.per_channel else "per-tensor") + (" symmetric" if q.symmetric else " asymmetric"),
           f"{q.calibration} calibration", "QAT" if q.qat else "", "k-means codebook" if q.kmeans else ""]
    quantized = q.bits < 32 or q.activation_bits < 32 or q.layers
    return f"{weights}, {acts}" + (f" ({', '.join(filter(None, how))})." if quantized else ".")


def trial_note(number: int, recipe: Recipe, metrics: Metrics, teacher: Metrics, fidelity: str = "full") -> str:
    """A trial's Markdown note: a headline, what its recipe does (a short list), and its numbers against the
    teacher's."""
    m, t = metrics, teacher
    noisy = " (noisy)" if m["latency_noisy"] else ""
    rows = [("validation accuracy", f"{100 * t['val_accuracy']:.2f}%",
             f"{100 * m['val_accuracy']:.2f}% ({-m['val_drop_pp']:+.2f} pp)"),
            ("test accuracy (reported only)", f"{100 * t['test_accuracy']:.2f}%",
             f"{100 * m['test_accuracy']:.2f}% ({-m['test_drop_pp']:+.2f} pp)"),
            ("size (ONNX file)", f"{t['size_bytes'] / 1e3:.1f} KB",
             f"{m['size_bytes'] / 1e3:.1f} KB ({m['compression_ratio']:.2f}x smaller)"),
            ("latency (ONNX Runtime)", f"{t['latency_ms']:.4f} ms",
             f"{m['latency_ms']:.4f} ms ({m['speedup']:.2f}x faster{noisy})"),
            ("MACs", f"{t['macs'] / 1e6:.3f} M", f"{m['macs'] / 1e6:.3f} M")]
    table = ["| | teacher | this trial |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    head = (f"## Trial {number}: {m['compression_ratio']:.2f}x smaller, {m['speedup']:.2f}x faster, "
            f"{-m['val_drop_pp']:+.2f} pp on validation")
    said = [f"- {sentence}" for sentence in describe(recipe)]  # a list: the dashboard does not wrap long lines
    return "\n".join([head, "", *said, "", *table, "", f"Fidelity: {fidelity}. The recipe is the "
                      "`recipe` user attribute and the `recipe.yaml` artifact; `autocomp export --trial "
                      f"{number}` writes it."])


def study_note(study: optuna.Study, task: str, space: str, narrowed: list[str] = ()) -> str:
    """The study's Markdown note: its teacher, task, space and objectives, and its trials so far by state."""
    t = study.user_attrs.get("teacher", {})
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state.name.lower() for trial in trials)
    best = len(study.best_trials) if states["complete"] else 0
    lines = [f"## {study.study_name}", "", f"Task `{task}`, space `{space}`, objectives "
             f"{', '.join(study.metric_names or [])} (chosen on the validation split; test is reported only)."]
    if t:
        lines += ["", f"Teacher: validation {100 * t['val_accuracy']:.2f}%, test {100 * t['test_accuracy']:.2f}%, "
                      f"{t['size_bytes'] / 1e3:.1f} KB, {t['latency_ms']:.4f} ms, {t['macs'] / 1e6:.3f} M MACs."]
    lines += ["", f"Trials: {len(trials)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); "
                  f"{best} on the Pareto front. `autocomp pareto` prints it with the hypervolume and the knee."]
    lines += [f"- {line}" for line in narrowed]
    return "\n".join(lines)


def annotate(trial: optuna.Trial, recipe: Recipe, metrics: Metrics, teacher: Metrics,
             constraints: dict[str, float]) -> None:
    """Store a complete trial's flat attributes and its note."""
    for key, value in flat(metrics, recipe, constraints).items():
        trial.set_user_attr(key, value)
    first_note(trial, trial_note(trial.number, recipe, metrics, teacher, trial.user_attrs.get("fidelity", "full")))


def first_note(trial: optuna.Trial, body: str) -> None:
    """A trial's note as ``optuna_dashboard.save_note`` stores it (a version, the body in chunks of the study's
    system attributes), without its two reads of every study attribute, each trial's note among them (a read that
    grows with the study, at every trial): a trial's note is written once, by its worker, at its end. (A study
    copied from another holds no stale notes: ``renote`` blanks them.)"""
    from optuna_dashboard._note import note_ver_key, split_body

    storage, study_id = trial.storage, trial.study._study_id
    storage.set_study_system_attr(study_id, note_ver_key(trial._trial_id), 1)
    for key, value in split_body(body, trial._trial_id).items():
        storage.set_study_system_attr(study_id, key, value)


def annotate_study(study: optuna.Study, task: str, space: str, narrowed: list[str] = ()) -> None:
    from optuna_dashboard import save_note

    save_note(study, study_note(study, task, space, narrowed))


def renote(study: optuna.Study) -> None:
    """Write every complete trial's note again: after ``optuna.copy_study``, whose trials have new ids (a trial's
    note is keyed by its id). The copied notes, keyed by the old ids, are blanked first: a new trial of one of
    those ids writes its note over them (``first_note``)."""
    import optuna

    for key in study._storage.get_study_system_attrs(study._study_id):
        if re.fullmatch(r"dashboard:\d+:note_str:\d+", key):  # a trial's, not the study's (dashboard:note_str:N)
            study._storage.set_study_system_attr(study._study_id, key, "")
    teacher = study.user_attrs.get("teacher")
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs: dict[str, Any] = frozen.user_attrs
        if teacher and "metrics" in attrs and "recipe" in attrs:
            first_note(optuna.Trial(study, frozen._trial_id),
                       trial_note(frozen.number, Recipe.from_dict(attrs["recipe"]), attrs["metrics"], teacher,
                                  attrs.get("fidelity", "full")))
