"""Scaling out on one machine: parallel workers on a journal file or PostgreSQL, and a search killed mid-trial."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from autocomp.storage import open_storage
from tests.dashboard import read_back_without_storage
from tests.test_cli import AUTOCOMP, autocomp

pytestmark = pytest.mark.xdist_group("processes")  # see pyproject.toml


def _check_count(storage: str, count: int) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(storage=open_storage(storage), study_name="quick").trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == count and "RUNNING" not in states, states
    assert len({t.number for t in trials}) == len(trials)
    return trials


def _study_stored(db: Path, name: str) -> bool:
    """Whether the SQLite file ``db`` holds study ``name``, read without writing: opening it with Optuna while
    another process creates its tables races that process's schema set-up (both insert its version)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:  # not created yet, or its tables still being made
        return False


@pytest.mark.slow
def test_two_workers_share_one_journal_one_count_and_one_teacher_baseline(quick_study, tmp_path, capsys):
    out = autocomp("search", str(quick_study), "--workers", "2", "--no-progress").stdout
    journal = tmp_path / "quick.journal"
    assert f"2 workers share the study in journal:///{journal}" in out and "4 complete, 0 fail" in out
    trials = _check_count(f"journal:///{journal}", 4)
    pids = {t.user_attrs["worker"]["pid"] for t in trials if t.state.name == "COMPLETE"}
    assert len(pids) == 2  # both workers ran trials
    read_back_without_storage(quick_study, tmp_path, capsys)


@pytest.mark.slow
def test_two_workers_on_postgresql(quick_study, postgres_url):
    out = autocomp("search", str(quick_study), "--workers", "2", "--storage", postgres_url, "--trials", "2",
                   "--no-progress").stdout
    assert "2 complete, 0 fail" in out
    _check_count(postgres_url, 2)


@pytest.mark.slow
def test_a_search_killed_mid_trial_loses_nothing_and_the_same_command_completes_it(quick_study, tmp_path):
    storage = f"sqlite:///{tmp_path / 'quick.db'}"
    command = [AUTOCOMP, "search", str(quick_study), "--no-progress"]
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it in its second trial, once the first is stored
        time.sleep(0.5)
        if not _study_stored(tmp_path / "quick.db", "quick"):
            continue
        trials = optuna.load_study(storage=storage, study_name="quick").trials
        states = [t.state.name for t in trials]
        if "COMPLETE" in states and any(t.state.name == "RUNNING" and "worker" in t.user_attrs for t in trials):
            break
    os.kill(search.pid, signal.SIGKILL)
    search.wait()
    killed = optuna.load_study(storage=storage, study_name="quick").trials
    complete = {t.number: t.values for t in killed if t.state.name == "COMPLETE"}
    (running,) = [t for t in killed if t.state.name == "RUNNING"]

    out = autocomp(*command[1:], "--trials", "4").stdout  # the study's own count said again: a total, not 4 more
    assert f"trial {running.number} was left running by a worker that died" in out
    trials = _check_count(storage, 4)
    assert {t.number: t.values for t in trials if t.number in complete} == complete  # nothing completed was lost
    assert trials[running.number].state.name == "FAIL"
    assert "WorkerDied" in trials[running.number].user_attrs["error"]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert retry.state.name in ("WAITING", "COMPLETE")  # queued again, after the trials already waiting
    assert {name: retry.params[name] for name in running.params} == running.params
