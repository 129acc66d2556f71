"""The proxy sampler spends full trials on candidates the cheap rung predicts to enter the front."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from autocomp.proxy import ProxyScore
from autocomp.search.proxy_sampler import ProxySampler, _front, _improvements

OBJECTIVES = {"val_accuracy": "maximize", "size_bytes": "minimize"}
TEACHER = {"val_accuracy": 0.95, "size_bytes": 1000.0}


def proxy_of(params: dict) -> ProxyScore:
    """A toy compression: ``level`` shrinks the model; ``bad`` ruins accuracy (the proxy sees it); ``noise`` is a
    dimension that changes nothing."""
    level, bad = params["level"], params["bad"]
    accuracy = 0.1 if bad else 0.9 - 0.5 * level**3
    return ProxyScore(accuracy, int(1000 * (1 - 0.9 * level)), None, 100, 10, 0.0)


def objective(trial: optuna.Trial) -> list[float]:
    params = {"level": trial.suggest_float("level", 0.0, 0.95), "bad": trial.suggest_categorical("bad", [0, 1]),
              "noise": trial.suggest_float("noise", 0.0, 1.0)}
    score = proxy_of(params)
    full = min(score.val_accuracy + 0.05, 1.0)  # the fine-tune recovers a little, the ranking is the proxy's
    trial.set_user_attr("proxy", score.to_dict())
    trial.set_user_attr("metrics", {"val_accuracy": full, "size_bytes": float(score.size_bytes)})
    return [full, float(score.size_bytes)]


def new_study(sampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(OBJECTIVES.values()), sampler=sampler)
    study.set_user_attr("teacher", TEACHER)
    for level in (0.2, 0.5):  # a warm start: run as enqueued
        for bad in (0, 1):
            study.enqueue_trial({"level": level, "bad": bad, "noise": 0.5})
    return study


@pytest.mark.alone  # the pool grows for a share of the trials' measured time: beside other tests it grows less
def test_full_trials_go_to_candidates_the_proxy_predicts_on_the_front():
    sampler = ProxySampler(proxy_of, OBJECTIVES, seed=0, first=64)
    study = new_study(sampler)
    study.optimize(objective, n_trials=12)
    warm, sampled = study.trials[:4], study.trials[4:]
    assert [(t.params["level"], t.params["bad"]) for t in warm] == [(0.2, 0), (0.2, 1), (0.5, 0), (0.5, 1)]
    assert all(t.params["bad"] == 0 for t in sampled)  # the proxy says bad candidates lose: never trained
    assert len({tuple(t.params.values()) for t in study.trials}) == len(study.trials)  # none twice
    assert len(sampler.pool) >= 64 + 2 * 7  # 64 before the first sampled trial, at least 2 before each next one
    accurate = [t for t in sampled if t.values[0] >= TEACHER["val_accuracy"] - 0.05]
    assert len(accurate) >= 6  # the sampler stays where the front can grow: within the reference's span
    random = new_study(optuna.samplers.RandomSampler(seed=0))
    random.optimize(objective, n_trials=12)
    assert sum(t.params["bad"] for t in random.trials[4:]) >= 1  # what blind sampling spends on them


def test_a_candidate_that_adds_hypervolume_beats_one_behind_the_front():
    front = np.array([[-0.9, 2.0], [-0.8, 1.0]])
    reference = np.array([-0.5, 3.0])
    gains = _improvements(front, np.array([[-0.85, 1.5], [-0.7, 2.5], [-0.2, 0.5], [-0.95, 0.5]]), reference)
    assert gains[3] > gains[0] > 0 == gains[1]  # dominating all > filling a gap > dominated
    assert gains[2] == 0  # outside the reference point: adds nothing
    assert math.isclose(gains[0], 0.05 * 0.5)


def test_past_fit_most_trials_the_predictor_learns_from_the_front_and_a_sample():
    sampler = ProxySampler(proxy_of, OBJECTIVES, seed=0, first=16, fit_most=8)
    study = new_study(sampler)
    study.optimize(objective, n_trials=14)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    front = {t.number for t in _front(complete, OBJECTIVES)}
    assert len(complete) == 14 and 8 < len(front) < 13
    assert sampler._fitted(complete[:8], _front(complete[:8], OBJECTIVES)) == complete[:8]  # all, up to fit_most
    fitted = {t.number for t in sampler._fitted(complete, _front(complete, OBJECTIVES))}
    assert len(fitted) == 8 and fitted < front  # a front larger than fit_most: a sample of it
    sampler.fit_most = 13
    fitted = {t.number for t in sampler._fitted(complete, _front(complete, OBJECTIVES))}
    assert len(fitted) == 13 and front < fitted  # the front and a sample of the others


def test_a_finished_trials_candidate_key_is_computed_once():
    calls: list[dict] = []  # a key decodes the recipe: at 1,000 trials, decoding all at each ask took 1.6 s
    sampler = ProxySampler(proxy_of, OBJECTIVES, key=lambda params: calls.append(params) or tuple(params.items()))
    done = optuna.trial.create_trial(params={"level": 0.5}, values=[0.9, 100.0],
                                     distributions={"level": optuna.distributions.FloatDistribution(0.0, 1.0)})
    assert sampler._key_of(done) == sampler._key_of(done) == (("level", 0.5),) and len(calls) == 1
    running = optuna.trial.create_trial(params={"level": 0.2}, state=optuna.trial.TrialState.RUNNING,
                                        distributions={"level": optuna.distributions.FloatDistribution(0.0, 1.0)})
    running.number = 1
    sampler._key_of(running), sampler._key_of(running)
    assert len(calls) == 3  # a running trial's values may still change: keyed afresh each time
