"""A trial that sleeps instead of training: the engine around trials (the sampler's ask, the storage, the backends'
scheduling) measured and tested without the cores training needs (``benchmarks/load.py``).

``Sleeping`` is the search's own objective (sampled recipe, duplicate check, stored user attributes, note, told
state) with its full run replaced: it sleeps 1-5 s, drawn from the trial's number (every run of a study sleeps
the same), and returns metrics drawn alike. Each trial records how long it slept, when (``slept_at``), and how
long the sampler took in its process since the last trial (``sampler_s``: this trial's ask and the last one's
tell), so that a trial's time outside its sleep splits into the searcher's share and the rest (the storage's and
the backend's).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import optuna

from autocomp.pipeline import CompressedModel
from autocomp.recipe import Recipe
from autocomp.search.objective import Objective
from autocomp.storage import batched

SLEEP_S = (1.0, 5.0)


class TimedSampler(optuna.samplers.BaseSampler):
    """``sampler`` with the seconds its calls take summed in ``seconds``."""

    def __init__(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler, self.seconds = sampler, 0.0

    def _timed(self, name: str, *args, **kwargs):
        began = time.perf_counter()
        try:
            return getattr(self.sampler, name)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - began

    def infer_relative_search_space(self, study, trial):
        return self._timed("infer_relative_search_space", study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._timed("sample_relative", study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._timed("sample_independent", study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        return self._timed("before_trial", study, trial)

    def after_trial(self, study, trial, state, values):
        return self._timed("after_trial", study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


class Sleeping(Objective):
    """The search's objective, sleeping 1-5 s in place of a recipe's full run (see the module)."""

    def __call__(self, trial: optuna.Trial) -> list[float]:
        study = trial.study
        if not isinstance(study.sampler, TimedSampler):  # a backend sets the sampler after building the objective
            study.sampler = TimedSampler(study.sampler)
            self._sampled = 0.0
        self._sampler = study.sampler
        return super().__call__(trial)

    def evaluate(self, trial: optuna.Trial, recipe: Recipe, ends: float | None) -> CompressedModel:
        draw = random.Random(trial.number)
        slept, began = draw.uniform(*SLEEP_S), time.time()
        time.sleep(slept)
        with batched(trial.study):  # one write, as a trial's own attributes are
            trial.set_user_attr("slept", slept)
            trial.set_user_attr("slept_at", began)  # when its own work began (its process had started)
            trial.set_user_attr("sampler_s", self._sampler.seconds - self._sampled)
        self._sampled = self._sampler.seconds
        teacher = self.baseline.metrics
        drop = draw.uniform(0.0, 0.05)
        metrics = {**teacher, "val_accuracy": teacher["val_accuracy"] - drop,
                   "test_accuracy": teacher["test_accuracy"] - drop,
                   "size_bytes": int(teacher["size_bytes"] * draw.uniform(0.05, 1.0)),
                   "latency_ratio": draw.uniform(0.2, 1.0), "macs": int(teacher["macs"] * draw.uniform(0.05, 1.0)),
                   "params": int(teacher["params"] * draw.uniform(0.05, 1.0)), "latency_noisy": False}
        return CompressedModel(model=None, artifact=Path(), metrics=metrics, kernels={}, layer_kernels={},
                               fp32_layers={}, seconds={"sleep": slept}, epochs=[])
