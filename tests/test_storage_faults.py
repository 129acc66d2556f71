"""What the machine and the storage do wrong during a search: a locked SQLite file, a PostgreSQL restart, a worker
killed (as the kernel's OOM killer kills), a trial past its time limit in a worker process. After each, every trial
that finished is stored whole (metrics, recipe, artifacts) or FAIL with its reason, and the search reaches its count.

The searches here run the search's own objective with trials that sleep 1-5 s (``tests.sleeping``), so a fault
lands mid-trial without the cores training needs."""

from __future__ import annotations

import os
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta, upload_artifact

from autocomp.cli import main
from autocomp.patient import StorageUnavailable
from autocomp.pipeline import RECIPE, CompressedModel
from autocomp.recipe import Recipe
from autocomp.search.optuna_runner import run_search
from autocomp.storage import open_storage
from autocomp.study import StudySpec
from tests.conftest import ROOT
from tests.sleeping import Sleeping

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]  # see pyproject.toml
DOWN_S = 6.0  # a PostgreSQL restart long enough that the workers' writes meet a server that is down


class SleepingStored(Sleeping):
    """``Sleeping``, storing the trial's recipe as its artifact, as a real trial does."""

    def evaluate(self, trial: optuna.Trial, recipe: Recipe, ends: float | None) -> CompressedModel:
        result = super().evaluate(trial, recipe, ends)
        with tempfile.TemporaryDirectory() as tmp:
            recipe.save(Path(tmp) / RECIPE)
            upload_artifact(artifact_store=self.store, file_path=str(Path(tmp) / RECIPE), study_or_trial=trial)
        return result


def sleeping_study(folder: Path, storage: str, trials: int, extra: str = "") -> StudySpec:
    path = folder / "sleep.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: sleep\ntask: tests.tasks:plateau\n"
                    f"space: {ROOT / 'search_spaces' / 'joint.yaml'}\ntrials: {trials}\npopulation_size: 4\n"
                    f"storage: {storage}\n{extra}")
    return StudySpec.load(path)


def when(storage: str, condition, timeout: float = 300) -> threading.Thread:
    """A thread that waits until ``condition(trials)`` holds for the study's stored trials, then returns."""
    def wait() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(0.3)
            try:
                trials = optuna.load_study(storage=open_storage(storage), study_name="sleep").trials
            except Exception:  # not created yet, its tables being created, the server down: look again
                continue
            if condition(trials):
                return
    return threading.Thread(target=wait, daemon=True)


def check_whole(storage: str, folder: Path, count: int) -> list[optuna.trial.FrozenTrial]:
    """Every trial finished; the count of finished trials reached; every complete one with its metrics, recipe and
    artifact; every failed one with its reason."""
    study = optuna.load_study(storage=open_storage(storage), study_name="sleep")
    trials = study.trials
    assert "RUNNING" not in [t.state.name for t in trials]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len([t for t in trials if t.state.name != "WAITING"]) >= count and complete
    for trial in complete:
        assert {"metrics", "recipe", "slept"} <= trial.user_attrs.keys()
        assert [m.filename for m in get_all_artifact_meta(trial, storage=study._storage)] == [RECIPE]
    for trial in trials:
        if trial.state.name == "FAIL":
            assert trial.user_attrs["error"] and trial.user_attrs["fault"]["type"]
    return trials


def test_a_postgresql_restart_mid_search_loses_no_trial(postgres_server, tmp_path):
    url = postgres_server.database("restart")
    spec = sleeping_study(tmp_path, url, 8)
    watch = when(url, lambda trials: sum(t.state.name == "COMPLETE" for t in trials) >= 2
                 and any(t.state.name == "RUNNING" for t in trials))
    restarted: list[float] = []

    def restart() -> None:
        watch.run()
        began = time.time()
        postgres_server.restart(down=DOWN_S)  # every connection dropped, and none answered for DOWN_S seconds
        restarted.append(time.time() - began)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    run_search(spec, progress=False, workers=2, objective=SleepingStored)
    thread.join(timeout=60)
    assert restarted and restarted[0] >= DOWN_S, "the server was not restarted mid-search"
    trials = check_whole(url, tmp_path, 8)
    assert sum(t.state.name == "COMPLETE" for t in trials) >= 8  # written through the restart, none failed


def test_a_database_down_for_longer_than_the_patience_stops_the_search_in_one_line(postgres_server, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv("AUTOCOMP_STORAGE_PATIENCE", "1")
    url = postgres_server.database("down")
    spec = sleeping_study(tmp_path, url, 8)
    watch = when(url, lambda trials: any(t.state.name == "COMPLETE" for t in trials))
    thread = threading.Thread(target=lambda: (watch.run(), postgres_server.restart(down=DOWN_S)), daemon=True)
    thread.start()
    with pytest.raises(StorageUnavailable, match="stayed unavailable for"):
        run_search(spec, progress=False, objective=SleepingStored)
    thread.join(timeout=60)
    trials = optuna.load_study(storage=open_storage(url), study_name="sleep").trials
    for trial in trials:  # a complete trial is whole; the one the outage cut holds no results, or is failed
        if trial.state.name == "COMPLETE":
            assert {"metrics", "recipe", "slept"} <= trial.user_attrs.keys()
        elif trial.state.name == "RUNNING":
            assert "metrics" not in trial.user_attrs


def test_a_worker_killed_mid_trial_is_failed_with_its_reason_and_the_search_reaches_its_count(tmp_path):
    storage = f"journal:///{tmp_path / 'sleep.journal'}"
    spec = sleeping_study(tmp_path, storage, 6)
    killed: list[int] = []

    def kill(trials) -> bool:
        running = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs
                   and t.user_attrs["worker"]["pid"] != os.getpid()]
        if running and not killed:
            os.kill(running[0].user_attrs["worker"]["pid"], signal.SIGKILL)  # as the OOM killer does
            killed.append(running[0].number)
        return bool(killed)

    watch = when(storage, kill)
    watch.start()
    run_search(spec, progress=False, workers=2, objective=SleepingStored)
    watch.join(timeout=10)
    trials = check_whole(storage, tmp_path, 6)
    (victim,) = [t for t in trials if t.number in killed]
    assert victim.state.name == "FAIL" and victim.user_attrs["fault"]["type"] == "WorkerDied"
    assert "stopped in the middle of this trial" in victim.user_attrs["error"]


def test_the_time_limit_holds_in_worker_processes(tmp_path):
    from tests.test_faults import faulty_study

    spec = faulty_study(tmp_path, "sleeps", "trial_timeout: 1.5\n")
    spec.storage = f"journal:///{tmp_path / 's.journal'}"
    study, trials = run_search(spec, progress=False, workers=2)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(trials) == 6 and failed and "RUNNING" not in [t.state.name for t in study.trials]
    for trial in failed:
        assert trial.user_attrs["fault"]["type"] == "TrialTimeout"
        assert "ran past its 1.5 s limit (trial_timeout)" in trial.user_attrs["fault"]["message"]
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both worker processes ran trials


def test_a_locked_sqlite_file_is_waited_for_then_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOCOMP_STORAGE_PATIENCE", "2")
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    study = optuna.create_study(storage=open_storage(storage), study_name="x")
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    lock = sqlite3.connect(tmp_path / "x.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the patience
    assert main(["pareto", "--storage", storage, "--study-name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autocomp: error: the study's storage {storage} stayed unavailable for ")
    assert err.endswith("database is locked\n") and err.count("\n") == 1
    threading.Timer(1.0, lambda: lock.execute("COMMIT")).start()  # a lock released within the patience: waited for
    began = time.time()
    assert len(optuna.load_study(storage=open_storage(storage), study_name="x").trials) == 2
    assert time.time() - began >= 0.9
