"""A study's trials read and written in plain queries (``autocomp.trial_rows``) are what Optuna's ORM reads and
writes, on SQLite and PostgreSQL; a worker's view of the other trials lags at most its ``lag``."""

from __future__ import annotations

import math
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from autocomp.storage import batched, holding, open_storage
from autocomp.trial_rows import ThrottledCache, lagging

pytestmark = pytest.mark.xdist_group("processes")  # beside the other tests of the session's PostgreSQL server


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rows.db'}"
    return request.getfixturevalue("postgres_server").database(f"rows_{tmp_path.name.lower().replace('-', '_')}")


def varied_study(url: str) -> optuna.Study:
    """Trials of every state, with parameters of every kind, values (one infinite), steps and attributes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(url), study_name="rows", directions=["maximize", "minimize"])
    for number in range(4):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("width", 8, 64, step=8)
        trial.suggest_categorical("kind", ["none", "logits", None])
        trial.set_user_attr("recipe", {"prune": {"sparsity": 0.1 * number}, "name": "ü"})
        study._storage.set_trial_intermediate_value(trial._trial_id, number, 0.5 * number)  # no report: 2 objectives
        if number < 2:
            study.tell(trial, [0.9, math.inf if number else 1.5])
        elif number == 2:
            study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial({"lr": 0.01}, user_attrs={"warm_start": True})
    return study


def test_trials_read_in_plain_queries_are_those_optunas_orm_reads(url):
    study = varied_study(url)
    storage = study._storage._backend
    ids = [t._trial_id for t in study.get_trials(deepcopy=False)]
    for states, included, newer in [(None, set(), -1), (None, {ids[1], ids[3]}, ids[3]), ((TrialState.RUNNING,),
                                    set(), -1), ((TrialState.COMPLETE, TrialState.WAITING), {ids[0]}, ids[2])]:
        ours = storage._get_trials(study._study_id, states, included, newer)
        optunas = RDBStorage._get_trials(storage, study._study_id, states, included, newer)
        assert ours and [vars(t) for t in ours] == [vars(t) for t in optunas]
    assert storage._get_trials(study._study_id, (TrialState.PRUNED,), set(), -1) == []
    with pytest.raises(KeyError):
        storage._get_trials(study._study_id + 1, None, set(), -1)


@pytest.mark.parametrize("journal", [False, True], ids=["database", "journal"])
def test_the_trials_holding_an_attribute_are_read_in_one_query_as_a_scan_of_the_study_finds_them(url, journal,
                                                                                                  tmp_path):
    """The duplicate check's read (``autocomp.storage.holding``): one query on a database, a scan elsewhere."""
    storage = open_storage(f"journal:///{tmp_path / 'rows.journal'}" if journal else url)
    study = optuna.create_study(storage=storage, study_name="keys")
    for key, state in [("a", TrialState.COMPLETE), ("b", TrialState.PRUNED), ("a", TrialState.FAIL), ("a", None)]:
        trial = study.ask()
        trial.set_user_attr("recipe_key", key)
        if key == "b":
            trial.set_user_attr("duplicate_of", 0)
        if state is not None:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
    assert holding(study, "recipe_key", "a", states, unless="duplicate_of") == [0, 3]  # 2 failed: it may run again
    assert holding(study, "recipe_key", "b", states, unless="duplicate_of") == []  # a duplicate itself
    assert holding(study, "recipe_key", "b", states, unless="other") == [1]
    assert holding(study, "recipe_key", "c", states, unless="duplicate_of") == []
    assert hasattr(study._storage, "_backend") and not journal == hasattr(study._storage._backend, "holding")


def test_a_batch_of_writes_is_checked_and_stored_as_optuna_stores_each(url):
    study = varied_study(url)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    trial = optuna.Trial(study, running._trial_id)
    with batched(study):
        trial.set_user_attr("recipe", {"changed": True})  # a key the trial has: replaced
        trial.set_user_attr("metrics", {"val_accuracy": 0.5})
        trial.set_user_attr("metrics", {"val_accuracy": 0.75})  # twice in one batch: the last
        trial.suggest_float("alpha", 0.0, 1.0)
        study._storage.set_trial_system_attr(trial._trial_id, "generation", 3)
    stored = open_storage(url).get_trial(trial._trial_id)  # what another process reads
    assert stored.user_attrs == {"recipe": {"changed": True}, "metrics": {"val_accuracy": 0.75}}
    assert stored.system_attrs["generation"] == 3 and set(stored.params) == {"lr", "width", "kind", "alpha"}

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))[0]
    with pytest.raises(UpdateFinishedTrialError):
        study._storage.set_trial_user_attr(finished._trial_id, "late", 1)
    with pytest.raises(KeyError):
        study._storage.set_trial_user_attr(10**6, "nobody", 1)
    other = study.ask()
    with pytest.raises(ValueError, match="Cannot set different distribution kind"):  # "lr" is a float elsewhere
        study._storage._backend._set_trial_param(other._trial_id, "lr", 0,
                                                 optuna.distributions.CategoricalDistribution(["a"]), None)
    study._storage._backend._set_trial_param(other._trial_id, "lr", 0.5, FloatDistribution(1e-4, 1.0, log=True), None)
    assert open_storage(url).get_trial(other._trial_id).params == {"lr": 0.5}


def test_a_workers_view_of_other_trials_lags_at_most_its_lag(tmp_path):
    url = f"sqlite:///{tmp_path / 'lag.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="lag")
    assert isinstance(study._storage, ThrottledCache)
    elsewhere = optuna.load_study(storage=open_storage(url), study_name="lag")  # another worker
    assert len(study.trials) == 0
    elsewhere.ask()
    assert len(study.trials) == 1  # outside a worker's loop: read at once
    with lagging(study, seconds=0.5):
        assert len(study.trials) == 1
        elsewhere.ask()
        assert len(study.trials) == 1  # read less than the lag ago: not read again
        time.sleep(0.5)
        assert len(study.trials) == 2
        own = study.ask()  # this worker's own trial and writes reach the storage at once
        own.set_user_attr("mine", 1)
        assert elsewhere._storage.get_trial(own._trial_id).user_attrs == {"mine": 1}
    elsewhere.ask()
    assert len(study.trials) == 4


def test_a_workers_view_of_the_studys_system_attributes_lags_too_but_holds_its_own_writes(tmp_path):
    url = f"sqlite:///{tmp_path / 'attrs.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="attrs")
    elsewhere = optuna.load_study(storage=open_storage(url), study_name="attrs")
    storage, sid = study._storage, study._study_id
    with lagging(study, seconds=60):
        before = storage.get_study_system_attrs(sid)
        elsewhere._storage.set_study_system_attr(sid, "theirs", 1)
        storage.set_study_system_attr(sid, "mine", 2)
        assert storage.get_study_system_attrs(sid) == {**before, "mine": 2}  # read less than the lag ago
    assert storage.get_study_system_attrs(sid) == {**before, "theirs": 1, "mine": 2}
