"""One trial of a study: its recipe sampled, checked, applied, measured and stored (every backend runs it)."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocomp import phase, proxy
from autocomp.allocation import Guide
from autocomp.faults import record, time_limit
from autocomp.measure import with_ratios
from autocomp.notes import annotate
from autocomp.pipeline import ARTIFACT, RECIPE, Baseline, CompressedModel, apply, student_counts
from autocomp.proxy import ProxyScore
from autocomp.recipe import Recipe
from autocomp.space import SearchSpace
from autocomp.storage import artifact_store, batched, holding, this_worker
from autocomp.study import StudySpec
from autocomp.tasks import Task

if TYPE_CHECKING:
    import optuna


class Objective:
    """One trial: its recipe sampled (``space.sample``), applied, measured and stored; ``proxy`` scores the recipe of
    any values of the space's dimensions on the cheap rung (``autocomp.proxy``), which the proxy sampler asks."""

    def __init__(self, spec: StudySpec, space: SearchSpace, task: Task, baseline: Baseline, prunable: dict,
                 quantizable: list[str], seed: int, guide: Guide | None) -> None:
        self.spec, self.space, self.task, self.baseline = spec, space, task, baseline
        self.prunable, self.quantizable, self.seed, self.guide = prunable, quantizable, seed, guide
        Path(spec.artifacts).mkdir(parents=True, exist_ok=True)
        self.store = artifact_store(spec.artifacts)
        self._dimensions = space.dimensions(prunable, spec.task, quantizable)
        self.tags: dict[str, Any] = {}  # user attributes a backend stores with every trial (where it ran)
        self._scores: dict[str, ProxyScore] = {}
        self._latency: proxy.LatencyModel | None = None

    def latency_model(self) -> proxy.LatencyModel | None:
        """The cheap rung's latency: the machine's per-layer table (``autocomp.latency_table``, at batch 1 and the
        study's threads), where the study minimises latency at batch 1; else None (MACs stand in)."""
        measure = self.spec.measure
        if self._latency is None and "latency_ms" in self.spec.objectives and measure.batch_size == 1:
            from autocomp.latency_table import LatencyTable

            self._latency = LatencyTable(threads=measure.threads).predict
        return self._latency

    def recipe(self, values: dict[str, Any]) -> Recipe:
        """The recipe of ``values`` (fixed dimensions at their value)."""
        return self.space.decode({name: values.get(name, param.candidates()[0])
                                  for name, param in self._dimensions.items()},
                                 self.spec.task, self.prunable, self.seed, self.spec.measure, self.quantizable,
                                 self.guide)

    def recipe_key(self, values: dict[str, Any]) -> str:
        """What ``values`` build (``Recipe.canonical``): values that differ only in dimensions their recipe does not
        use (another family's knobs) build the same."""
        return self.recipe(values).canonical()

    def proxy(self, values: dict[str, Any]) -> ProxyScore:
        return self._proxy(self.recipe(values))

    def _proxy(self, recipe: Recipe) -> ProxyScore:
        """The cheap rung's score of ``recipe``, once per recipe in this process (the sampler's pick is scored)."""
        key = recipe.canonical()
        if key not in self._scores:
            self._scores[key] = proxy.score(recipe, self.task, self.latency_model())
        return self._scores[key]

    def __call__(self, trial: optuna.Trial) -> list[float]:
        """Run one trial; an error anywhere in it is stored as its ``error`` and ``fault`` (``autocomp.faults``)."""
        with _reason_recorded(trial):
            return self._trial(trial)

    def _trial(self, trial: optuna.Trial) -> list[float]:
        spec, task = self.spec, self.task
        ends = None if spec.trial_timeout is None else time.monotonic() + spec.trial_timeout
        phase.stage(f"trial {trial.number}, sample")  # a fault names this trial's phase, not the last one's
        with batched(trial.study):  # the sampled recipe lands in one write (autocomp.patient)
            trial.set_user_attr("worker", this_worker())  # how a dead worker's trial is found (autocomp.storage)
            for key, value in self.tags.items():
                trial.set_user_attr(key, value)
            recipe = self.space.sample(trial, spec.task, self.prunable, seed=self.seed, measure=spec.measure,
                                       quantizable=self.quantizable, guide=self.guide)
            trial.set_user_attr("recipe", recipe.to_dict())
            key = recipe_digest(recipe)
            trial.set_user_attr("recipe_key", key)  # what later trials compare with: no stored recipe is read again
        _check_caps(trial, recipe, task, spec.constraints)
        _check_duplicate(trial, key)
        if spec.sampler == "proxy":  # what the proxy sampler learns from: the proxy beside the full result
            trial.set_user_attr("proxy", self._proxy(recipe).to_dict())
        screen = spec.screening.screen(recipe) if spec.screening and "warm_start" not in trial.user_attrs else None
        if screen is not None:
            phase.stage(f"trial {trial.number}, screen")
            _screen(trial, screen, task, self.baseline, spec, ends)
        trial.set_user_attr("fidelity", "full")
        phase.stage(f"trial {trial.number}")
        result = self.evaluate(trial, recipe, ends)
        metrics = with_ratios(result.metrics, self.baseline.metrics)
        with batched(trial.study):  # the results land in one write, or none of them (autocomp.patient)
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("seconds", result.seconds)
            trial.set_user_attr("epochs", result.epochs)  # per pruning round, as trained (early stopping may cut)
            trial.set_user_attr("kernels", result.kernels)
            trial.set_user_attr("layer_kernels", result.layer_kernels)
            trial.set_user_attr("fp32_layers", result.fp32_layers)  # asked for int8, computed in fp32: why
            for metric, cap in spec.constraints.items():  # feasible at 0 or below (Optuna's convention)
                trial.set_constraint(metric, (metrics[metric] - cap) / cap)
            annotate(trial, recipe, metrics, self.baseline.metrics, spec.constraints)  # what the dashboard shows
        return [metrics[name] for name in spec.objectives]

    def evaluate(self, trial: optuna.Trial, recipe: Recipe, ends: float | None) -> CompressedModel:
        """The trial's full run: ``recipe`` applied and measured before ``ends`` (time.monotonic()), its artifact
        and recipe stored with the trial. (A subclass may evaluate otherwise: ``tests/sleeping.py`` sleeps.)"""
        return _run_trial(trial, recipe, self.task, self.baseline.artifact, self.store, ends, self.spec.trial_timeout)


def recipe_digest(recipe: Recipe) -> str:
    """What a trial stores to say which recipe it runs (``Recipe.canonical``, hashed), compared with later trials'."""
    return hashlib.sha256(recipe.canonical().encode()).hexdigest()[:16]


def _check_duplicate(trial: optuna.Trial, key: str) -> None:
    """Raise ``TrialPruned``, untrained, when another trial of the study (finished or running) holds the same recipe
    (its ``recipe_key``, read from the storage now): a recipe is evaluated once. The trial records which one
    (``duplicate_of``)."""
    import optuna
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)  # a failed recipe may run again
    for number in holding(trial.study, "recipe_key", key, states, unless="duplicate_of"):
        if number != trial.number:
            trial.set_user_attr("duplicate_of", number)
            raise optuna.TrialPruned(f"the recipe of trial {number} again: not run twice")


def _check_caps(trial: optuna.Trial, recipe: Recipe, task: Task, caps: dict[str, float]) -> None:
    """Raise ``TrialPruned``, untrained and infeasible (its constraints stored), when the sampled student's
    parameters or MACs exceed the study's caps."""
    import optuna

    if not caps.keys() & {"params", "macs"}:
        return
    counts = student_counts(recipe, task)
    over = [f"{metric} {counts[metric]:,} > {caps[metric]:,.0f}" for metric in ("params", "macs")
            if metric in caps and counts[metric] > caps[metric]]
    if over:
        for metric, cap in caps.items():  # the artifact's size is unknown untrained: not counted against it
            trial.set_constraint(metric, (counts[metric] - cap) / cap if metric in counts else 0.0)
        reason = f"infeasible before training: the student's {', '.join(over)} (study constraints)"
        trial.set_user_attr("infeasible", reason)
        raise optuna.TrialPruned(reason)


def _screen(trial: optuna.Trial, screen: Recipe, task: Task, baseline: Baseline, spec: StudySpec,
            ends: float | None) -> None:
    """Run and store the trial's screen; raise ``TrialPruned`` unless it is promoted (``autocomp.fidelity``)."""
    import optuna

    result = _run_trial(trial, screen, task, baseline.artifact, ends=ends, limit=spec.trial_timeout)
    metrics = with_ratios(result.metrics, baseline.metrics)
    values = [metrics[name] for name in spec.objectives]
    trial.set_user_attr("screen", {"epochs": screen.finetune.epochs, "values": values, "metrics": metrics,
                                   "seconds": result.seconds})
    screens = [t.user_attrs["screen"]["values"] for t in trial.study.get_trials(deepcopy=False)
               if "screen" in t.user_attrs and t.number != trial.number] + [values]
    if not spec.screening.promoted(values, screens, list(spec.objectives.values())):
        trial.set_user_attr("fidelity", "screen")
        raise optuna.TrialPruned(f"screened out after {screen.finetune.epochs} epochs of fine-tune")


@contextlib.contextmanager
def _reason_recorded(trial: optuna.Trial) -> Iterator[None]:
    """Store an error raised inside as the trial's failure reason (``error``) and ``fault`` (type, message, phase),
    and raise it on; the innermost block that sees an error records it. A pruned trial is not an error."""
    import optuna

    try:
        yield
    except optuna.TrialPruned:
        raise
    except Exception as err:
        record(trial, err)
        raise


def _run_trial(trial: optuna.Trial, recipe: Recipe, task: Task, reference: Path,
               store: object | None = None, ends: float | None = None, limit: float | None = None) -> CompressedModel:
    """``apply`` one recipe before the trial's time ``limit`` (seconds) runs out at ``ends`` (time.monotonic());
    store its artifact and recipe in ``store`` (if any), or its error as the failure reason."""
    from optuna.artifacts import upload_artifact

    with tempfile.TemporaryDirectory() as tmp:
        with _reason_recorded(trial), time_limit(None if ends is None else ends - time.monotonic(),
                                                 f"trial {trial.number}", limit):
            result = apply(recipe, task, tmp, progress=False, reference=reference)
        for name in (ARTIFACT, RECIPE) if store is not None else ():
            upload_artifact(artifact_store=store, file_path=str(Path(tmp) / name), study_or_trial=trial)
    return result
