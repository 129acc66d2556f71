"""Proxy-guided search: look at many candidates on the cheap rung, train few (ARCHITECTURE.md "Two rungs").

How full trials are chosen, in one line: each sampled trial runs the candidate, among all those the cheap rung
(``autocomp.proxy``) has scored, whose predicted point adds the most hypervolume to the study's measured front.

- **Candidates.** Before the first sampled trial the sampler scores ``first`` candidates; before each next one it
  scores more for at most ``share`` of a full trial's median time (at least 2), so looking stays cheap next to
  training: half drawn at random from the space, half mutations of the front's trials (each dimension changed
  with probability 2/d, at least one). Scores are kept for the rest of the search (``pool``).
- **Prediction.** Validation accuracy after the full fine-tune is predicted from the proxy's accuracy, size,
  latency (or MACs), MACs per parameter (what kind of network: a convolution reuses its weights, a Linear layer
  does not) and whether the student learns from scratch (its proxy accuracy is after a short
  distillation, not after pruning), by a ridge line and a Gaussian process on its residuals, fitted to the
  study's complete trials (scikit-learn), optimistic by one standard deviation of what the trials leave unknown
  (their scatter apart); size, latency and MACs from the proxy's by a line in log space fitted the same way.
- **Choice.** The candidate whose predicted point adds the most hypervolume to the front of complete trials (in
  log size and log latency), among candidates no trial has run; where none adds any, the same with accuracy
  predicted two, then three sd optimistic, and last the one whose accuracy the trials leave most unknown.

The sampler's own cost stays flat as a study grows: past ``fit_most`` complete trials the predictor is fitted to
the front and a random sample of the rest, and only candidates no other candidate's prediction dominates are
weighed (they hold the best).

Enqueued trials (the warm start, retries) run as enqueued, and until ``startup`` trials are complete every trial
is drawn at random. Proxy numbers only rank candidates: a trial's reported numbers are its full run's.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study
from optuna.study._multi_objective import _is_pareto_front  # vectorised; Optuna's public API has none
from optuna.trial import FrozenTrial, TrialState

from autocomp.proxy import ProxyScore

# what the proxy says of each metric a study may optimise (val_accuracy is predicted by the Gaussian process)
PROXY_OF = {"size_bytes": "size_bytes", "latency_ms": "latency_ms", "macs": "macs", "params": "params",
            "nonzero_params": "params"}
Scorer = Callable[[dict[str, Any]], ProxyScore]
GP_ITERATIONS = 50  # of the Gaussian process's hyperparameter fit
OPTIMISM = (1.0, 2.0, 3.0)  # sd added to predicted accuracy: one, more where nothing would add hypervolume


class ProxySampler(BaseSampler):
    """An Optuna sampler that picks each trial among candidates scored on the cheap rung (module docstring)."""

    def __init__(self, score: Scorer, objectives: dict[str, str], seed: int | None = None, first: int = 32,
                 share: float = 0.15, startup: int = 4, span: float = 0.02, fit_most: int = 100,
                 key: Callable[[dict[str, Any]], Hashable] | None = None) -> None:
        self._score, self._objectives, self.span, self.fit_most = score, objectives, span, fit_most
        self._key = key or _key  # what a candidate builds: values that differ only where unused are one candidate
        self._ran: dict[int, Hashable] = {}  # trial number -> its key
        self._rng = random.Random(seed)
        self._random = RandomSampler(seed=seed)
        self._space = IntersectionSearchSpace()
        self._dimensions: dict[str, BaseDistribution] = {}
        self.first, self.share, self.startup = first, share, startup
        self.pool: dict[Hashable, tuple[dict[str, Any], ProxyScore]] = {}

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The dimensions every finished trial holds, kept once found: autocomp's spaces sample every dimension in
        every trial (README "Fixed dimensions"), and recomputing them reads every trial (0.2 s at 1,000)."""
        if not self._dimensions:
            self._dimensions = self._space.calculate(study)
        return self._dimensions

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "proxy" in t.user_attrs and "metrics" in t.user_attrs]
        if not search_space or "fixed_params" in trial.system_attrs or len(complete) < self.startup:
            return {}
        front = _front(complete, self._objectives)
        seconds = statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in complete)
        self._grow(search_space, [t.params for t in front], self.first if not self.pool else None,
                   self.share * seconds)
        ran = {self._key_of(t) for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params}
        candidates = [(params, score) for key, (params, score) in self.pool.items() if key not in ran]
        if not candidates:
            return {}
        predictor = Predictor(self._fitted(complete, front), self._objectives)
        measured = np.array([_loss_point(t.user_attrs["metrics"], self._objectives) for t in front])
        reference = self._reference(study.user_attrs["teacher"])
        scores = [score for _, score in candidates]
        mean, sd = predictor.accuracy(np.array([_features(score) for score in scores]))
        for optimism in OPTIMISM:  # more optimistic only where no candidate adds hypervolume at the last
            predicted = predictor.points(scores, mean + optimism * sd)
            # the best is among the candidates no other candidate dominates: one that does adds at least as much
            kept = np.flatnonzero(_is_pareto_front(predicted, assume_unique_lexsorted=False))
            gains = _improvements(measured, predicted[kept], reference)
            if gains.max() > 0:
                best = int(kept[np.argmax(gains)])
                break
        else:  # nothing would add any: learn where the predictor knows least
            best = int(np.argmax(sd))
        return {name: candidates[best][0][name] for name in search_space if name in candidates[best][0]}

    def _fitted(self, complete: list[FrozenTrial], front: list[FrozenTrial]) -> list[FrozenTrial]:
        """The trials the predictor is fitted to: all of them up to ``fit_most``, past it the front and a random
        sample of the others (a Gaussian process's fit grows with the cube of its points), or of the front alone
        where it holds more."""
        if len(complete) <= self.fit_most:
            return complete
        if len(front) >= self.fit_most:
            return self._rng.sample(front, self.fit_most)
        on_front = {t.number for t in front}
        others = [t for t in complete if t.number not in on_front]
        return front + self._rng.sample(others, self.fit_most - len(front))

    def _key_of(self, trial: FrozenTrial) -> Hashable:
        """The key of a trial's candidate, kept once the trial has finished (its values no longer change)."""
        if trial.number in self._ran:
            return self._ran[trial.number]
        key = self._key(trial.params)  # decodes the recipe: once per finished trial, not at every ask
        if trial.state.is_finished():
            self._ran[trial.number] = key
        return key

    def _reference(self, teacher: dict[str, float]) -> np.ndarray:
        """The hypervolume's reference point: the teacher, ``span`` below it in accuracy (the region a user
        compresses for: smaller, faster, and nearly as accurate)."""
        return np.array(_loss_point({**teacher, "val_accuracy": teacher["val_accuracy"] - self.span},
                                    self._objectives))

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _grow(self, space: dict[str, BaseDistribution], parents: list[dict[str, Any]], count: int | None,
              seconds: float) -> None:
        """Score ``count`` new candidates, or (None) as many as ``seconds`` allow, at least 2: half at random, half
        mutations of ``parents``."""
        started = time.perf_counter()
        for i in itertools.count():
            if (i >= count) if count is not None else (i >= 2 and time.perf_counter() - started > seconds):
                break
            params = _mutate(self._rng.choice(parents), space, self._rng) if parents and i % 2 else {
                name: _draw(d, self._rng) for name, d in space.items()}
            try:
                key = self._key(params)
            except Exception:  # values the recipe's rules refuse: not a candidate
                continue
            if key in self.pool:
                continue
            try:
                self.pool[key] = (params, self._score(params))
            except Exception:  # a candidate the recipe's rules or the model refuse: not a candidate
                continue


class Predictor:
    """Full-fidelity objective values from proxy scores, fitted to the study's complete trials."""

    def __init__(self, complete: list[FrozenTrial], objectives: dict[str, str]) -> None:
        self.objectives = objectives
        proxies = [ProxyScore(**t.user_attrs["proxy"]) for t in complete]
        metrics = [t.user_attrs["metrics"] for t in complete]
        self.lines = {name: _log_line([_proxy_value(p, name) for p in proxies], [m[name] for m in metrics])
                      for name in objectives if name in PROXY_OF}
        self.accuracy = _accuracy_model(np.array([_features(p) for p in proxies]),
                                        np.array([m["val_accuracy"] for m in metrics]))
        self.best = max(m["val_accuracy"] for m in metrics)

    def points(self, scores: list[ProxyScore], accuracy: np.ndarray) -> np.ndarray:
        """(N, objectives) predicted loss points (``_loss_point``'s space) of ``scores`` whose accuracy is predicted
        as ``accuracy`` (from ``self.accuracy``, made optimistic by the caller), never above the best measured (a
        compressed model that beats every trial and the teacher is noise, not a find)."""
        columns = []
        for name, direction in self.objectives.items():
            if name == "val_accuracy":
                value = np.minimum(accuracy, self.best)
                columns.append(-value if direction == "maximize" else value)
            else:
                slope, intercept = self.lines[name]
                logs = slope * np.log([max(_proxy_value(s, name), 1e-12) for s in scores]) + intercept
                columns.append(logs if direction == "minimize" else -logs)
        return np.stack(columns, axis=1)


def _accuracy_model(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Full-fidelity accuracy (mean, sd) from proxy features: a line in the proxy's accuracy (``_line_features``),
    and a Gaussian process on what the line leaves. Far from every trial the prediction falls back on the line (a
    candidate the proxy scores low is predicted low), not on the trials' mean accuracy, which would make every
    unexplored corner look promising."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    from sklearn.linear_model import Ridge

    center, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    line = Ridge(alpha=1e-3).fit(_line_features(x), y)
    residuals = y - line.predict(_line_features(x))
    unit = residuals.std() + 1e-9  # the process is fitted on residuals in units of their spread
    kernel = ConstantKernel(1.0) * RBF(length_scale=np.ones(x.shape[1])) + WhiteKernel(1e-2)
    gp = GaussianProcessRegressor(kernel, optimizer=_bounded_optimizer, random_state=0)
    with warnings.catch_warnings():  # a few points leave some length scales at their bounds: expected, not news
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit((x - center) / scale, residuals / unit)
    noise = gp.kernel_.k2.noise_level  # the fitted white noise (variance, in units)

    def predict(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and the sd of what the trials leave unknown (the fitted noise apart: a candidate near many trials
        is not promising because trials scatter)."""
        z = (q - center) / scale
        mean, sd = gp.predict(z, return_std=True)
        return line.predict(_line_features(q)) + unit * mean, unit * np.sqrt(np.maximum(sd**2 - noise, 0.0))

    return predict


def _bounded_optimizer(objective: Callable, theta: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """scikit-learn's L-BFGS-B fit of the kernel's hyperparameters, at most ``GP_ITERATIONS`` steps: the fit's time
    stays bounded whatever the trials (unbounded, it took 0.1-2 s on 50-200 trials here)."""
    from scipy.optimize import minimize

    result = minimize(objective, theta, method="L-BFGS-B", jac=True, bounds=bounds,
                      options={"maxiter": GP_ITERATIONS})
    return result.x, result.fun


def _line_features(x: np.ndarray) -> np.ndarray:
    """What the line reads of ``_features``: the proxy's accuracy, with a slope and an intercept of their own for
    students from scratch (a short distillation's accuracy says more of the full one than a pruned teacher's does
    before its fine-tune). Nothing else: extrapolated, size or MACs would predict anything."""
    accuracy, scratch = x[:, 0], x[:, -1]
    return np.stack([accuracy * (1 - scratch), accuracy * scratch, scratch], axis=1)


def _features(score: ProxyScore) -> list[float]:
    speed = score.latency_ms if score.latency_ms is not None else float(max(score.macs, 1))
    return [score.val_accuracy, math.log(max(score.size_bytes, 1)), math.log(max(speed, 1e-12)),
            math.log(max(score.macs, 1) / max(score.params, 1)), float(score.scratch)]


def _proxy_value(score: ProxyScore, metric: str) -> float:
    """The proxy's figure for ``metric``: latency from the table where there is one, else MACs stand in."""
    if metric == "latency_ms" and score.latency_ms is None:
        return float(max(score.macs, 1))
    return float(getattr(score, PROXY_OF[metric]))


def _log_line(proxy: Sequence[float], full: Sequence[float]) -> tuple[float, float]:
    """log(full) = slope * log(proxy) + intercept, least squares (slope 1 with fewer than 3 distinct points)."""
    x, y = np.log(np.maximum(proxy, 1e-12)), np.log(np.maximum(full, 1e-12))
    if len(set(np.round(x, 6))) < 3:
        return 1.0, float(np.mean(y - x))
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _loss_point(metrics: dict[str, float], objectives: dict[str, str]) -> list[float]:
    """A trial's objectives as losses: accuracy negated where maximised, the other metrics in log."""
    point = []
    for name, direction in objectives.items():
        value = metrics[name] if name == "val_accuracy" else math.log(max(metrics[name], 1e-12))
        point.append(-value if direction == "maximize" else value)
    return point


def _front(trials: list[FrozenTrial], objectives: dict[str, str]) -> list[FrozenTrial]:
    points = np.array([_loss_point(t.user_attrs["metrics"], objectives) for t in trials])
    return [trials[i] for i in np.flatnonzero(_is_pareto_front(points, assume_unique_lexsorted=False))]


def _improvements(front: np.ndarray, candidates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The hypervolume each candidate adds to ``front`` (losses) within ``reference`` (0: none): the volume of its
    box up to the reference, less what the front already covers of it (the front clipped to the box, whose
    non-dominated points are few, so the cost does not grow with the front)."""
    from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG (its public API has none for N-D)

    def gain(point: np.ndarray) -> float:
        if not (point < reference).all():
            return 0.0
        clipped = np.maximum(front, point)
        clipped = clipped[(clipped < reference).all(axis=1)]
        if len(clipped):
            clipped = clipped[_is_pareto_front(clipped, assume_unique_lexsorted=False)]
        covered = compute_hypervolume(clipped, reference) if len(clipped) else 0.0
        return max(float(np.prod(reference - point)) - covered, 0.0)

    return np.array([gain(point) for point in candidates])


def _draw(distribution: BaseDistribution, rng: random.Random) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return rng.choice(distribution.choices)
    low, high = distribution.low, distribution.high
    if distribution.log:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return _snap(distribution, value)


def _snap(distribution: BaseDistribution, value: float) -> Any:
    """``value`` on the distribution's grid and within its bounds."""
    low, high = distribution.low, distribution.high
    value = min(max(value, low), high)
    step = getattr(distribution, "step", None)
    if step:
        value = low + round((value - low) / step) * step
        value = min(value, high)
    if isinstance(distribution, IntDistribution):
        return int(round(value))
    return round(value, 10) if step else value


def _mutate(parent: dict[str, Any], space: dict[str, BaseDistribution], rng: random.Random) -> dict[str, Any]:
    """``parent`` with each dimension changed with probability 2/d (at least one changed)."""
    names = list(space)
    child = {name: parent.get(name, _draw(space[name], rng)) for name in names}
    changed = [n for n in names if rng.random() < 2 / len(names)] or [rng.choice(names)]
    for name in changed:
        d = space[name]
        if isinstance(d, CategoricalDistribution):
            others = [c for c in d.choices if c != child[name]]
            child[name] = rng.choice(others) if others else child[name]
        elif isinstance(d, (FloatDistribution, IntDistribution)):
            if d.log:
                child[name] = _snap(d, math.exp(math.log(child[name]) + rng.gauss(0, 0.2 * math.log(d.high / d.low))))
            else:
                child[name] = _snap(d, child[name] + rng.gauss(0, 0.2 * (d.high - d.low)))
    return child


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((name, round(v, 9) if isinstance(v, float) else v) for name, v in params.items()))
