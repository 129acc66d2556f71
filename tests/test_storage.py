"""Storages by URL, and the trials of a worker that died: failed with the reason, retried, counted once."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autocomp.errors import ConfigError
from autocomp.search.trials import counted
from autocomp.storage import (
    alive,
    fail_dead_trials,
    located,
    move_to_shared,
    open_storage,
    resolve,
    shared,
    this_worker,
)


def test_relative_sqlite_and_journal_paths_are_anchored_at_the_study_folder(tmp_path):
    assert resolve("journal:///s.journal", tmp_path) == f"journal:///{tmp_path}/s.journal"
    assert resolve("sqlite:///s.db", tmp_path) == f"sqlite:///{tmp_path}/s.db"
    assert resolve("postgresql://u@127.0.0.1/db", tmp_path) == "postgresql://u@127.0.0.1/db"
    with pytest.raises(ConfigError, match="`storage` must start with one of .* but got 'redis://x'"):
        open_storage("redis://x")


def _dead_worker() -> dict[str, object]:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return {"host": socket.gethostname(), "pid": int(process.stdout), "started": None}


def test_a_dead_workers_trial_is_failed_with_the_reason_retried_once_and_counted_once(tmp_path):
    study = optuna.create_study(storage=open_storage(f"journal:///{tmp_path / 's.journal'}"), study_name="s")
    dead, live = study.ask(), study.ask()
    dead.suggest_float("x", 0.0, 1.0)
    dead.set_user_attr("worker", _dead_worker())
    live.set_user_attr("worker", this_worker())
    assert alive(this_worker()) and not alive(dead.user_attrs["worker"])
    assert alive({"host": "another-node", "pid": 1, "started": None})  # heartbeats judge other hosts

    assert fail_dead_trials(study) == [dead.number]
    assert fail_dead_trials(study) == []  # failed once: no second retry
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "RUNNING", "WAITING"]
    failed, _, queued = study.trials
    assert "WorkerDied: worker" in failed.user_attrs["error"]
    assert queued.params == failed.params and queued.system_attrs["failed_trial"] == dead.number

    study.tell(live, 1.0)
    assert [t.number for t in counted(study.trials)] == [live.number]  # the failure counts through its retry
    retry = study.ask()
    assert retry.number == queued.number and retry.params == failed.params
    study.tell(retry, 0.5)
    assert [t.number for t in counted(study.trials)] == [live.number, retry.number]


def test_pareto_of_a_missing_journal_names_the_file_and_creates_nothing(tmp_path: Path):
    from autocomp.errors import AutocompError
    from autocomp.search.trials import load_study

    with pytest.raises(AutocompError, match="does not exist"):
        load_study(f"journal:///{tmp_path / 'none.journal'}", "x")
    assert not (tmp_path / "none.journal").exists()


def test_a_parallel_search_moves_a_sqlite_study_into_the_journal_beside_it_where_every_command_finds_it(tmp_path):
    sqlite = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=open_storage(sqlite), study_name="s")
    study.set_user_attr("teacher", {"val_accuracy": 0.9})
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    assert located(sqlite, "s") == sqlite  # no journal yet: the YAML's SQLite file
    journal = move_to_shared(sqlite, "s")
    assert journal == f"journal:///{tmp_path / 's.journal'}" and located(sqlite, "s") == journal
    moved = optuna.load_study(storage=open_storage(journal), study_name="s")
    assert [t.params for t in moved.trials] == [t.params for t in study.trials]
    assert moved.user_attrs["teacher"] == {"val_accuracy": 0.9}
    moved.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    assert move_to_shared(sqlite, "s") == journal  # copied once: the journal's own trials are kept
    assert len(optuna.load_study(storage=open_storage(journal), study_name="s").trials) == 4
    assert located(sqlite, "other") == sqlite  # another study of the same file stays where it is
    postgres = "postgresql://u@127.0.0.1/db"
    assert shared(postgres) == postgres and located(postgres, "s") == postgres


def test_a_batch_of_trial_writes_lands_whole_or_not_at_all(tmp_path):
    from autocomp.storage import batched

    url = f"sqlite:///{tmp_path / 'b.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="b")
    trial = study.ask()
    elsewhere = open_storage(url)  # what another process reads
    with batched(study):
        trial.set_user_attr("metrics", {"val_accuracy": 0.9})
        trial.suggest_float("x", 0.0, 1.0)
        assert elsewhere.get_trial(trial._trial_id).user_attrs == {}  # held until the block ends
    seen = elsewhere.get_trial(trial._trial_id)
    assert seen.user_attrs == {"metrics": {"val_accuracy": 0.9}} and set(seen.params) == {"x"}
    with pytest.raises(RuntimeError), batched(study):
        trial.set_user_attr("recipe", {"seed": 0})
        raise RuntimeError("a fault mid-way")
    assert "recipe" not in elsewhere.get_trial(trial._trial_id).user_attrs  # none of the block's writes
    trial.set_user_attr("error", "RuntimeError: a fault mid-way")  # outside a block: at once
    assert "error" in elsewhere.get_trial(trial._trial_id).user_attrs


def test_a_trials_note_reads_back_in_the_dashboard_and_a_moved_studys_old_notes_do_not_show_through(tmp_path):
    from optuna_dashboard import get_note

    from autocomp.notes import first_note

    sqlite = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=open_storage(sqlite), study_name="s")
    for trial in [study.ask() for _ in range(3)]:
        first_note(trial, f"## {trial.number}\n" + "long " * 600)  # 3,000 characters: two chunks
        assert get_note(trial) == f"## {trial.number}\n" + "long " * 600
    moved = optuna.load_study(storage=open_storage(move_to_shared(sqlite, "s")), study_name="s")
    new = [moved.ask() for _ in range(2)]  # ids 3 and 4 of the journal: the SQLite file's id 3 had a note
    for trial in new:
        first_note(trial, f"## {trial.number} short")
    assert [get_note(trial) for trial in new] == ["## 3 short", "## 4 short"]
