"""Trials that go wrong: each is stored FAIL with its fault (type, message, phase), every trial that finished before
it keeps its final state, and the search goes on to the count it was asked for."""

from __future__ import annotations

import optuna
import pytest

from autocomp.search.optuna_runner import run_search
from autocomp.search.trials import summary
from autocomp.study import StudySpec
from tests.conftest import QUICK_MEASURE_YAML

SPACE = """schema_version: 1
prune: {scope: local, sparsity: [0.0, 0.5], criteria: [l1]}
finetune: {epochs: 1, lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def faulty_study(tmp_path, task: str, extra: str = ""):
    (tmp_path / "space.yaml").write_text(SPACE)
    path = tmp_path / "s.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: s\ntask: 'tests.tasks:{task}'\nspace: space.yaml\ntrials: 6\n"
                    f"sampler: random\nseed: 3\n{extra}" + QUICK_MEASURE_YAML)
    return StudySpec.load(path)


@pytest.mark.parametrize(("task", "extra", "kind", "message", "phase"), [
    ("raises", "", "RuntimeError", "this model cannot train pruned", "fine-tune epoch 1/1"),
    ("goes_nan", "", "NonFiniteLoss", "the training loss became nan (trial ", "fine-tune epoch 1/1"),
    ("sleeps", "trial_timeout: 1.5\n", "TrialTimeout", "ran past its 1.5 s limit (trial_timeout)",
     "fine-tune epoch 1/1"),
    ("hungry", "", "MemoryError", "", "fine-tune epoch 1/1"),
], ids=["raises", "nan", "timeout", "memory"])
def test_a_faulty_trial_is_stored_with_its_fault_and_the_search_goes_on(tmp_path, task, extra, kind, message,
                                                                        phase):
    study, trials = run_search(faulty_study(tmp_path, task, extra), progress=False)
    states = [t.state.name for t in study.trials]
    assert len(trials) == 6 and "RUNNING" not in states  # the count asked for, every trial finished
    failed = [t for t in trials if t.state.name == "FAIL"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert failed and complete  # pruned recipes fault, unpruned ones complete: both in one study
    for trial in complete:
        assert trial.params["prune.sparsity"] == 0.0 and "metrics" in trial.user_attrs
    for trial in failed:
        fault = trial.user_attrs["fault"]
        assert trial.params["prune.sparsity"] == 0.5 and "metrics" not in trial.user_attrs
        assert fault["type"] == kind and message in fault["message"] and fault["phase"].endswith(phase)
        assert trial.user_attrs["error"].startswith(f"{kind}: ")
    assert f"faults by kind: {len(failed)} {kind}" in summary(trials)
    stored = optuna.load_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    assert [t.state.name for t in stored.trials] == states  # as the run left them


def test_the_time_limit_holds_in_any_thread_as_in_ray_tunes_trial_threads():
    import threading
    import time

    from autocomp.faults import TrialTimeout, time_limit

    caught: list[BaseException] = []

    def trial() -> None:
        try:
            with time_limit(0.2, "trial 7", limit=30):
                while True:  # pure Python: interrupted between bytecodes
                    time.sleep(0.01)
        except TrialTimeout as err:
            caught.append(err)

    worker = threading.Thread(target=trial)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert [type(e).__name__ for e in caught] == ["TrialTimeout"]
    assert str(caught[0]).startswith("trial 7 ran past its 30 s limit (trial_timeout)")
    with time_limit(5.0):  # a block that ends in time is not interrupted afterwards
        pass
    time.sleep(0.05)
