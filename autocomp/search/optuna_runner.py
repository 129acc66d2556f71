"""The local search: an Optuna study whose trials each run ``apply`` on one sampled Recipe."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from autocomp.compress.blocks import residual_blocks
from autocomp.compress.prune import prunable_layers
from autocomp.features import layer_names
from autocomp.measure import with_ratios
from autocomp.pipeline import ARTIFACT, RECIPE, apply, teacher_metrics
from autocomp.space import SearchSpace
from autocomp.study import StudySpec
from autocomp.tasks import load_task

FINISHED = ("COMPLETE", "FAIL", "PRUNED")


def make_sampler(spec: StudySpec, seed: int):
    import optuna

    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(spec: StudySpec, seed: int = 0, create: bool = True):
    """Create or continue the study in ``spec.storage`` (the sampler is seeded per continuation)."""
    import optuna

    if not create:
        return load_study(spec.storage, spec.study_name)
    return optuna.create_study(
        storage=spec.storage, study_name=spec.study_name, load_if_exists=True,
        directions=list(spec.objectives.values()), sampler=make_sampler(spec, seed),
    )


def load_study(storage: str, study_name: str):
    """Load an existing study, or raise a one-line error listing the studies that do exist."""
    import optuna

    from autocomp.errors import AutocompError, did_you_mean

    try:
        return optuna.load_study(storage=storage, study_name=study_name)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise AutocompError(f"No study {study_name!r} in {storage}; it holds {names}."
                            f"{did_you_mean(study_name, names)}") from None


def finished_trials(study) -> int:
    return sum(t.state.name in FINISHED for t in study.trials)


def run_search(spec: StudySpec, trials: int | None = None, seed: int | None = None, progress: bool = True):
    """Run trials until the study holds ``trials`` finished ones; return the study.

    Every input is checked before the study is opened, so bad input leaves storage untouched.
    """
    import optuna
    from optuna.artifacts import FileSystemArtifactStore

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = trials or spec.trials
    seed = spec.seed if seed is None else seed
    space = SearchSpace.load(spec.space)
    task = load_task(spec.task)
    prunable = prunable_layers(task.teacher, task.example_input)
    quantizable = layer_names(task.teacher)
    space.layer_names(prunable, spec.task)
    space.check_blocks(residual_blocks(task.teacher, task.example_input), spec.task)
    study = open_study(spec, seed)
    done = finished_trials(study)
    study.sampler = make_sampler(spec, seed + done)  # a continuation must not replay the same draws
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    teacher = _teacher_metrics(study, task, spec)
    Path(spec.artifacts).mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(spec.artifacts)

    def objective(trial) -> list[float]:
        recipe = space.sample(trial, spec.task, prunable, seed=seed, measure=spec.measure, quantizable=quantizable)
        trial.set_user_attr("recipe", recipe.to_dict())
        result = _run_trial(trial, recipe, task, store)
        metrics = with_ratios(result.metrics, teacher)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("kernels", result.kernels)
        trial.set_user_attr("layer_kernels", result.layer_kernels)
        return [metrics[name] for name in spec.objectives]

    if trials > done:
        study.optimize(objective, n_trials=trials - done, catch=(Exception,), show_progress_bar=progress)
    return study


def _run_trial(trial, recipe, task, store):
    """``apply`` one recipe; store its artifact and recipe, or its error as the failure reason."""
    from optuna.artifacts import upload_artifact

    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = apply(recipe, task, tmp, progress=False)
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        for name in (ARTIFACT, RECIPE):
            upload_artifact(artifact_store=store, file_path=str(Path(tmp) / name), study_or_trial=trial)
    return result


def _teacher_metrics(study, task, spec: StudySpec) -> dict[str, float]:
    """The teacher measured once per study by the same ``apply`` path, with nothing compressed."""
    if "teacher" in study.user_attrs:
        return study.user_attrs["teacher"]
    metrics = teacher_metrics(task, spec.measure)
    study.set_user_attr("teacher", metrics)
    study.set_user_attr("task", spec.task)
    return metrics
