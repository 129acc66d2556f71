"""A journal file's batch of writes: one append, seen by other workers whole or not at all, in the order written."""

from __future__ import annotations

import optuna
import pytest

from autocomp.storage import batched, open_storage


def _appends(storage, monkeypatch) -> list[int]:
    """The number of lines of each append to the file, from now on."""
    counts: list[int] = []
    append = storage._backend.append_logs
    monkeypatch.setattr(storage._backend, "append_logs", lambda logs: (counts.append(len(logs)), append(logs))[1])
    return counts


def test_a_batch_of_writes_lands_in_one_append_seen_by_others_only_at_its_end(tmp_path, monkeypatch):
    url = f"journal:///{tmp_path / 's.journal'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", directions=["maximize"])
    other = optuna.load_study(storage=open_storage(url), study_name="s")  # another worker
    trial = study.ask()
    appends = _appends(study._storage, monkeypatch)
    with batched(study):
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_categorical("kind", ["a", "b"])
        trial.set_user_attr("recipe", {"x": 1})
        study._storage.set_study_system_attr(study._study_id, "note", "n")  # the study's attributes are held too
        assert "x" not in other.trials[0].params and "recipe" not in other.trials[0].user_attrs  # nothing yet
    assert appends == [4]
    seen = other.trials[0]
    assert seen.params.keys() == {"x", "kind"} and seen.user_attrs == {"recipe": {"x": 1}}
    assert other._storage.get_study_system_attrs(other._study_id)["note"] == "n"
    trial.set_user_attr("alone", 1)  # outside a batch: as Optuna writes, one append each
    assert appends == [4, 1]


def test_a_write_a_batch_does_not_hold_lands_what_it_holds_first_and_a_failed_block_lands_nothing(
        tmp_path, monkeypatch):
    url = f"journal:///{tmp_path / 's.journal'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", directions=["maximize"])
    trial = study.ask()
    appends = _appends(study._storage, monkeypatch)
    with batched(study):
        trial.set_user_attr("metrics", 1)
        study.tell(trial, 0.5)  # not held: the attribute before it, so the told trial holds it
    assert appends == [1, 1]
    assert study.trials[0].user_attrs == {"metrics": 1} and study.trials[0].state.name == "COMPLETE"

    failed = study.ask()
    with pytest.raises(RuntimeError), batched(study):
        failed.set_user_attr("metrics", 2)
        raise RuntimeError("the trial broke")
    failed.set_user_attr("error", "the trial broke")
    assert optuna.load_study(storage=open_storage(url), study_name="s").trials[1].user_attrs == {
        "error": "the trial broke"}
