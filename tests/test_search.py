"""The search ranks trials on the validation split, reports the test split, and says when it failed."""

from __future__ import annotations

import time

import optuna

from autocomp.search.optuna_runner import run_search
from autocomp.study import StudySpec
from tests.conftest import QUICK_MEASURE_YAML
from tests.test_cli import autocomp_here

SPACE = """schema_version: 1
prune: {scope: local, sparsity: %s, criteria: [l1]}
quantize: {bits: [32, 16]}
finetune: {epochs: 0, lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
"""


def study(tmp_path, task: str, sparsity: str) -> StudySpec:
    (tmp_path / "space.yaml").write_text(SPACE % sparsity)
    path = tmp_path / "s.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: s\ntask: '{task}'\nspace: space.yaml\ntrials: 3\n"
                    "population_size: 2\n" + QUICK_MEASURE_YAML)
    return path


def test_trials_are_ranked_on_validation_and_test_is_only_reported(tmp_path):
    study_obj, trials = run_search(StudySpec.load(study(tmp_path, "tests.tasks:val_test_disagree", "0.0")),
                                   progress=False)
    assert study_obj.user_attrs["teacher"]["val_accuracy"] == 1.0
    assert study_obj.user_attrs["teacher"]["test_accuracy"] == 0.0
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" or "duplicate_of" in t.user_attrs for t in trials)
    for trial in [t for t in trials if t.state.name == "COMPLETE"]:  # NSGA-II may breed a recipe again
        metrics = trial.user_attrs["metrics"]
        assert trial.values[0] == metrics["val_accuracy"] == 1.0 and metrics["test_accuracy"] == 0.0
        assert metrics["test_drop_pp"] == metrics["val_drop_pp"] == 0.0


def test_a_run_whose_every_trial_failed_exits_non_zero_with_the_reasons(tmp_path, capsys):
    path = study(tmp_path, "tests.tasks:fixed_view", "0.5")
    (tmp_path / "space.yaml").write_text(SPACE.replace("epochs: 0", "epochs: 1") % "0.5")
    out, err = autocomp_here(capsys, "search", str(path), "--no-progress", expect=1)
    assert "this run: 3 trial(s): 0 complete, 3 fail, 0 pruned" in out
    assert "3 x ValueError: this model trains with 8 channels after conv1, not 4" in out
    assert "every trial of this run failed" in err
    stored = optuna.load_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    assert [t.state.name for t in stored.trials] == ["FAIL"] * 3  # each recorded with its reason
    assert all(t.user_attrs["error"] for t in stored.trials)


def test_a_wall_clock_budget_stops_starting_trials(tmp_path):
    spec = StudySpec.load(study(tmp_path, "tests.tasks:val_test_disagree", "0.0"))
    started = time.monotonic()
    # a count no machine reaches in the budget: the clock, not the count, ends the run
    study_obj, trials = run_search(spec, trials=100_000, progress=False, timeout=5)
    assert 1 <= len(trials) < 100_000
    assert all(t.state.name == "COMPLETE" or "duplicate_of" in t.user_attrs for t in trials)  # none failed
    last = max(t.datetime_start for t in trials).timestamp()  # counted from the call, the teacher's baseline too
    # Optuna checks the clock, then creates the trial in storage: a start may trail the check by a write
    assert last - (time.time() - (time.monotonic() - started)) <= 5 + 1


def test_a_student_over_the_studys_caps_is_never_trained(digits_task, tmp_path):
    (tmp_path / "space.yaml").write_text("""schema_version: 1
student:
  family: [mlp]
  mlp: {depth: [1], width: [8, 512], norm: [none]}
finetune: {epochs: 1}
distill: {kind: logits, alpha: {low: 0.5, high: 0.9}}
""")
    path = tmp_path / "s.yaml"  # 64 inputs: 8 hidden units hold 610 parameters, 512 hold 38,410
    path.write_text("schema_version: 1\nstudy_name: s\ntask: digits\nspace: space.yaml\ntrials: 8\nsampler: random\n"
                    "constraints: {params: 5000}\n" + QUICK_MEASURE_YAML)
    study_obj, trials = run_search(StudySpec.load(path), progress=False)
    over = [t for t in trials if t.params["student.mlp.width.1"] == 512]
    under = [t for t in trials if t.params["student.mlp.width.1"] == 8]
    assert over and under and len(over) + len(under) == 8
    for t in over:  # stored, with the reason and its constraint, but never trained or measured
        assert t.state.name == "PRUNED" and "seconds" not in t.user_attrs and "metrics" not in t.user_attrs
        assert t.user_attrs["infeasible"] == ("infeasible before training: the student's params 38,410 > 5,000 "
                                              "(study constraints)")
        assert t.constraints == {"params": (38_410 - 5000) / 5000}
    for t in under:
        assert t.state.name == "COMPLETE" and t.user_attrs["metrics"]["params"] == 610
        assert t.constraints == {"params": (610 - 5000) / 5000}
    assert {t.number for t in study_obj.best_trials} <= {t.number for t in under}  # the front: feasible only


def test_a_recipe_is_evaluated_once(tmp_path):
    """Two recipes in all (fp32, fp16): of four trials two run, and the others are stored untrained as what they
    are, duplicates of the trial that ran their recipe, which a float's last bits do not hide."""
    path = study(tmp_path, "tests.tasks:val_test_disagree", "0.0")
    (tmp_path / "space.yaml").write_text(SPACE.replace("lr: {low: 1.0e-4, high: 1.0e-2, log: true}", "lr: 0.001")
                                         % "0.0")
    spec = StudySpec.load(path)
    study_obj, _ = run_search(spec, trials=1, progress=False)
    study_obj.enqueue_trial({"quantize.bits": 32})
    study_obj.enqueue_trial({"quantize.bits": 16})
    study_obj.enqueue_trial({"quantize.bits": 32})
    study_obj, trials = run_search(spec, trials=4, progress=False)
    states = [t.state.name for t in study_obj.trials]
    assert states.count("COMPLETE") == 2 and states.count("PRUNED") == 2, states
    by_number = {t.number: t for t in study_obj.trials}
    for trial in study_obj.trials:
        if trial.state.name == "PRUNED":
            original = by_number[trial.user_attrs["duplicate_of"]]
            assert original.state.name == "COMPLETE" and original.user_attrs["recipe"] == trial.user_attrs["recipe"]
            assert "metrics" not in trial.user_attrs and "fidelity" not in trial.user_attrs  # nothing was trained
    complete = [t for t in study_obj.trials if t.state.name == "COMPLETE"]
    assert {t.user_attrs["recipe"]["quantize"]["bits"] for t in complete} == {32, 16}


def test_every_backend_the_cli_offers_is_registered():
    from autocomp.cli import _parser
    from autocomp.search.backends import BACKENDS

    search = _parser()._subparsers._group_actions[0].choices["search"]
    backend = next(a for a in search._actions if a.dest == "backend")
    assert list(backend.choices) == BACKENDS.names() and backend.default in BACKENDS


def test_a_continued_run_counts_the_queued_trials_it_ran(tmp_path):
    path = study(tmp_path, "tests.tasks:val_test_disagree", "{low: 0.0, high: 0.9}")
    (tmp_path / "space.yaml").write_text((SPACE % "{low: 0.0, high: 0.9}") + "warm_start: {levels: [0.3, 0.6]}\n")
    spec = StudySpec.load(path)
    stored, first = run_search(spec, trials=1, progress=False)
    assert len(first) == 1 and set(t.state.name for t in stored.trials[1:]) == {"WAITING"}  # the rest queued
    stored, second = run_search(StudySpec.load(path), trials=2, progress=False)
    assert [t.number for t in second] == [1] and second[0].user_attrs.get("warm_start")  # it ran, and counts
