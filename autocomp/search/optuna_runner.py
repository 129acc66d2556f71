"""The search: an Optuna study whose trials each run ``apply`` on one sampled Recipe (``autocomp.search.objective``),
run by a backend (``autocomp.search.backends``: this machine, or a Ray cluster). What a trial is, whatever
runs it, is ``autocomp.search.trials``."""

from __future__ import annotations

import tempfile
import time
import warnings
from typing import TYPE_CHECKING

from autocomp.errors import AutocompError
from autocomp.notes import annotate_study
from autocomp.pipeline import Baseline, teacher_baseline
from autocomp.search.backends import BACKENDS, Launch
from autocomp.search.objective import Objective
from autocomp.search.trials import (
    FINISHED,
    Prepared,
    Run,
    check_fingerprint,
    open_study,
    prepare,
    study_guide,
    study_sensitivity,
)
from autocomp.search.warm_start import group_sizes, smaller_students, warm_start
from autocomp.sensitivity import Sensitivity
from autocomp.space import SearchSpace
from autocomp.storage import fail_dead_trials
from autocomp.study import StudySpec
from autocomp.tasks import Task
from autocomp.tasks.load import load_task

if TYPE_CHECKING:
    import optuna

    from autocomp.search.ray_runner import RayOptions


def run_search(spec: StudySpec, trials: int | None = None, seed: int | None = None, progress: bool = True,
               timeout: float | None = None, workers: int = 1, ray: RayOptions | None = None,
               objective: type[Objective] = Objective):
    """Run trials until the study holds ``trials`` finished ones, or until ``timeout`` seconds (default: the
    study's) have passed since the call (running trials finish; the teacher's baseline and sensitivity map
    count too); return the study and the trials of this run. ``workers`` processes run trials side by side
    on the study's storage (a journal file or a database; not SQLite), or, with ``ray``, Ray Tune runs them on
    a Ray cluster (``autocomp.search.ray_runner``). Each worker runs ``objective`` (a subclass may evaluate a
    recipe otherwise).

    Every input is checked before the study is opened, so bad input leaves storage untouched.
    """
    import optuna

    started = time.time()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = trials or spec.trials
    seed = spec.seed if seed is None else seed
    parallel = f"--workers {workers}" if workers > 1 else "--backend ray" if ray is not None else None
    if parallel and spec.storage.startswith("sqlite"):
        raise AutocompError(f"{parallel} needs a storage many processes can share, but got {spec.storage}: "
                            "pass --storage journal:///<file> (one machine) or postgresql://... (README).")
    if ray is not None:
        ray.check()
    prepared = prepare(spec)
    study = _open(spec, seed, prepared)
    before = {t.number for t in study.trials if t.state.name in FINISHED}  # queued trials run now count
    space, task, prunable = prepared.space, prepared.task, prepared.prunable
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _baseline(study, task, spec, tmp)
        study_guide(study, space, task, prunable, progress)  # stored for every worker
        if not study.trials:  # a new study opens with the hand-made policies
            _enqueue_warm_start(study, space, spec.task, task, prunable, prepared.quantizable, progress)
        budget = timeout or spec.timeout
        run = Run(spec, trials, seed, baseline.artifact, None if budget is None else started + budget, objective)
        backend = BACKENDS.get("local" if ray is None else "ray")
        annotate_study(study, spec.task, spec.space, prepared.narrowed)
        backend(run, Launch(study, prepared, workers, ray, progress))
        annotate_study(study, spec.task, spec.space, prepared.narrowed)
    return study, [t for t in study.trials if t.number not in before and t.state.name in FINISHED]


def _open(spec: StudySpec, seed: int, prepared: Prepared) -> optuna.Study:
    """The study, opened for this run: the space's narrowing said and stored, its teacher and data checked against
    the study's, the trials of dead workers failed (queued again), its metrics named."""
    import optuna

    for line in prepared.narrowed:
        print(f"autocomp: {line}")
    study = open_study(spec, seed)
    if prepared.narrowed:
        study.set_user_attr("narrowed", prepared.narrowed)
    check_fingerprint(study.user_attrs.get("fingerprint"), prepared.task.fingerprint(), f"study {spec.study_name!r}")
    for number in fail_dead_trials(study):
        print(f"autocomp: trial {number} was left running by a worker that died: failed, and queued again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    return study


def _enqueue_warm_start(study: optuna.Study, space: SearchSpace, name: str, task: Task, prunable: dict,
                        quantizable: list[str], progress: bool) -> None:
    sensitivity = study_sensitivity(study, task, progress) if space.warm_start.sensitivity else None
    groups = {layer: p.group for layer, p in prunable.items()}
    dims = space.dimensions(prunable, name, quantizable)
    for policy in warm_start(dims, space.warm_start.levels, sensitivity, groups,
                             group_sizes(task.teacher, groups), space.warm_start.formats,
                             smaller_students(space.warm_start.students, task)):
        study.enqueue_trial(policy, user_attrs={"warm_start": True}, skip_if_exists=True)


def sensitivity_of(spec: StudySpec, recompute: bool = False, progress: bool = True) -> Sensitivity:
    """The sensitivity map of the study's teacher, from the study (created if new) or analysed and stored."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = load_task(spec.task)
    study = open_study(spec, spec.seed)
    check_fingerprint(study.user_attrs.get("fingerprint"), task.fingerprint(), f"study {spec.study_name!r}")
    study.set_user_attr("fingerprint", task.fingerprint())
    return study_sensitivity(study, task, progress, recompute)


def _baseline(study: optuna.Study, task: Task, spec: StudySpec, out_dir: str) -> Baseline:
    """The teacher's artifact for this run, timed against; its metrics are measured once per study
    (they fix the study's latency scale) and stored with the task's fingerprint."""
    baseline = teacher_baseline(task, spec.measure, out_dir)
    if "teacher" not in study.user_attrs:
        study.set_user_attr("teacher", baseline.metrics)
        study.set_user_attr("task", spec.task)
        study.set_user_attr("fingerprint", task.fingerprint())
    return Baseline(baseline.artifact, study.user_attrs["teacher"])
