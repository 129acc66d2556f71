"""What one trial of a study is, whatever runs it (a worker of ``autocomp.search.worker``: in this process, in
worker processes, or in Ray actors): the study opened on its storage, its sampler, the space narrowed to the
task's model, the objective a worker builds, and the study's books (trials counted, fingerprints checked, a run
summed up)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autocomp.allocation import Guide, tied_parameters
from autocomp.compress.facts import teacher_facts
from autocomp.config import in_file
from autocomp.errors import AutocompError
from autocomp.narrowing import narrow_to_model
from autocomp.pipeline import Baseline
from autocomp.search.objective import Objective
from autocomp.sensitivity import Sensitivity, cached
from autocomp.space import SearchSpace
from autocomp.storage import local_path, open_storage
from autocomp.study import StudySpec
from autocomp.tasks import Task
from autocomp.tasks.load import load_task
from autocomp.tasks.registry import import_plugins

if TYPE_CHECKING:
    import optuna

FINISHED = ("COMPLETE", "FAIL", "PRUNED")
SEED_STRIDE = 7919  # a prime between the sampler seeds of workers or retries: no two draw alike


@dataclass(frozen=True)
class Run:
    """What every worker of one ``autocomp search`` shares (picklable: a worker process rebuilds the rest)."""

    spec: StudySpec
    trials: int  # finished trials the study should hold
    seed: int
    reference: Path  # the teacher's artifact, timed against
    deadline: float | None  # time.time() after which no trial starts
    objective: type[Objective] = Objective  # what each worker builds and runs per trial


def make_sampler(spec: StudySpec, seed: int, objective: Objective | None = None):
    """The study's sampler; the proxy sampler scores candidates through ``objective`` (random sampling without)."""
    import optuna

    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec.population_size,
                                         warn_independent_sampling=False)
    if spec.sampler == "proxy" and objective is not None:
        from autocomp.search.proxy_sampler import ProxySampler

        return ProxySampler(objective.proxy, spec.objectives, seed=seed, key=objective.recipe_key)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(spec: StudySpec, seed: int = 0, create: bool = True):
    """Create or continue the study in ``spec.storage`` (the sampler is seeded per continuation)."""
    import optuna

    if not create:
        return load_study(spec.storage, spec.study_name)
    return optuna.create_study(
        storage=open_storage(spec.storage), study_name=spec.study_name, load_if_exists=True,
        directions=list(spec.objectives.values()), sampler=make_sampler(spec, seed),
    )


def load_study(storage: str, study_name: str):
    """Load an existing study, or raise a one-line error listing the studies that do exist."""
    import optuna

    from autocomp.errors import did_you_mean

    path = local_path(storage)
    if path is not None and not path.exists():
        raise AutocompError(f"No study {study_name!r}: {storage} does not exist.")
    try:
        return optuna.load_study(storage=open_storage(storage), study_name=study_name)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage))]
        raise AutocompError(f"No study {study_name!r} in {storage}; it holds {names}."
                            f"{did_you_mean(study_name, names)}") from None


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The finished trials that count towards the study's total: a failed trial that was retried (its worker
    died) is counted through its retry."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state.name in FINISHED and t.number not in retried]


def finished_trials(study) -> int:
    return len(counted(study.get_trials(deepcopy=False)))


@dataclass(frozen=True)
class Prepared:
    """A study's space narrowed to its task's model, the task, and the layers every trial's apply reads."""

    space: SearchSpace
    task: Task
    prunable: dict
    quantizable: list[str]
    narrowed: list[str]  # each narrowing of the space, said as a line


def prepare(spec: StudySpec) -> Prepared:
    """The study's space narrowed to its task's model, with the task and its prunable and quantizable layers."""
    with in_file(spec.source):  # an error of the study's task or space names the file
        import_plugins(spec.task)  # a user task's own plug-ins, before its space names them
        space = SearchSpace.load(spec.space)
        task = load_task(spec.task)
        facts = teacher_facts(task)  # found once: every trial's apply reads the same
        space.layer_names(facts.prunable, spec.task)
        narrowed = [*facts.left_out, *narrow_to_model(space, task, spec.task)]
    return Prepared(space, task, facts.prunable, facts.layers, narrowed)


def make_objective(run: Run, study: optuna.Study, prepared: Prepared | None = None) -> Objective:
    """The objective every backend runs: one trial's recipe sampled, applied, measured and stored. A worker that
    loads the task itself (no ``prepared``) checks it against the study's fingerprint, as ``run_search`` did."""
    if prepared is None:
        prepared = prepare(run.spec)
        check_fingerprint(study.user_attrs.get("fingerprint"), prepared.task.fingerprint(),
                          f"study {run.spec.study_name!r}")
    p = prepared
    baseline = Baseline(run.reference, study.user_attrs["teacher"])
    guide = study_guide(study, p.space, p.task, p.prunable, progress=False)
    return run.objective(run.spec, p.space, p.task, baseline, p.prunable, p.quantizable, run.seed, guide)


def study_guide(study: optuna.Study, space: SearchSpace, task: Task, prunable: dict,
                progress: bool = True) -> Guide | None:
    """What a space's ``policy`` derives every layer's choice from (``autocomp.allocation``): the teacher's
    sensitivity map and the parameters tied to each pruning group, stored with the study; None without a policy."""
    if not space.policy:
        return None
    sensitivity = study_sensitivity(study, task, progress)
    if "tied_parameters" not in study.user_attrs:
        study.set_user_attr("tied_parameters", tied_parameters(task.teacher, task.example_input, prunable, task.train))
    return Guide(sensitivity, study.user_attrs["tied_parameters"])


def study_sensitivity(study: optuna.Study, task: Task, progress: bool = True, recompute: bool = False) -> Sensitivity:
    """The teacher's sensitivity map stored with ``study``, stored first where it has none: from the cache of
    maps (``autocomp.sensitivity.cached``: one analysis per teacher), or analysed afresh with ``recompute``."""
    if recompute or "sensitivity" not in study.user_attrs:
        study.set_user_attr("sensitivity", cached(task, progress=progress, recompute=recompute).to_dict())
    return Sensitivity.from_dict(study.user_attrs["sensitivity"])


def fingerprint_mismatch(recorded: dict[str, str] | None, current: dict[str, str], where: str) -> str | None:
    """One line saying how ``where``'s teacher or data (``recorded``) differ from this task's (``current``);
    None when both are the same (or nothing was recorded)."""
    for key in ("teacher_sha256", "data_sha256", "teachers_sha256"):  # extra teachers (Task.teachers), where any
        if recorded and recorded.get(key) != current.get(key):
            cpu, used = recorded.get("cpu"), recorded.get("kernels", "unrecorded")
            elsewhere = key == "teacher_sha256" and cpu and (cpu, used) != (current["cpu"], current["kernels"])
            hint = (f" It was made on a {cpu} CPU ({used} kernels), this machine is a {current['cpu']} "
                    f"({current['kernels']}): a teacher trained on another CPU model or with other kernels differs "
                    "in its last bits." if elsewhere else "")
            return (f"{where} was made with {key} {(recorded.get(key) or 'none')[:12]}..., but this task's is "
                    f"{(current.get(key) or 'none')[:12]}...: another teacher or other data.{hint}")
    return None


def check_fingerprint(recorded: dict[str, str] | None, current: dict[str, str], where: str) -> None:
    """Refuse to mix results of another teacher or other data: ``recorded`` is what ``where`` was made with."""
    mismatch = fingerprint_mismatch(recorded, current, where)
    if mismatch:
        raise AutocompError(mismatch)


def front_status(study: optuna.Study) -> str:
    """The progress bar's view of the study: its front's size and validation hypervolume so far
    (``autocomp.analysis``)."""
    from autocomp.analysis import front, hypervolume
    from autocomp.pareto import complete_metrics

    points = list(complete_metrics(study).values())
    on_front = [points[i] for i in front(points)]
    teacher = study.user_attrs.get("teacher")
    return ", ".join([f"front {len(on_front)}"] + ([f"HV {hypervolume(on_front, teacher, 'val'):.3f}"] if teacher
                                                    else []))


def budget_left(deadline: float | None) -> str:
    """The time left of a run's budget ("" without one)."""
    import time

    if deadline is None:
        return ""
    left = max(0, int(deadline - time.time()))
    return f"budget left {left // 60}m{left % 60:02d}s"


def summary(trials: list[optuna.trial.FrozenTrial]) -> str:
    """One line of counts by state, and the most common failure reasons."""
    counts = Counter(t.state.name for t in trials)
    reasons = Counter(failure(t) for t in trials if t.state.name == "FAIL")
    infeasible = sum("infeasible" in t.user_attrs for t in trials)
    lines = [f"this run: {len(trials)} trial(s): " + ", ".join(f"{counts[s]} {s.lower()}" for s in FINISHED)
             + (f" ({infeasible} over the study's constraints, not trained)" if infeasible else "")]
    faults = Counter(t.user_attrs.get("fault", {}).get("type", "unrecorded") for t in trials if t.state.name == "FAIL")
    if faults:
        lines.append("  faults by kind: " + ", ".join(f"{n} {kind}" for kind, n in faults.most_common()))
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(3)]
    return "\n".join(lines)


def failure(trial: optuna.trial.FrozenTrial) -> str:
    """The first line of a failed trial's reason (the whole reason is its ``error`` user attribute)."""
    lines = trial.user_attrs.get("error", "no reason recorded (see the Optuna log)").splitlines()
    return lines[0][:200] if lines else ""
