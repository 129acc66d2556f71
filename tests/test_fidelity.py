"""Multi-fidelity: short screens, promotion by non-dominated rank, and a front of full-fidelity trials only."""

from __future__ import annotations

import pytest

from autocomp.errors import AutocompError, ConfigError
from autocomp.fidelity import Screening, non_domination_ranks
from autocomp.pareto import export_recipe, front_table
from autocomp.recipe import FineTune, Prune, Quantize, Recipe
from autocomp.search.optuna_runner import run_search
from autocomp.study import StudySpec
from tests.conftest import QUICK_MEASURE_YAML

DIRECTIONS = ["maximize", "minimize"]


def test_non_domination_ranks_peel_fronts():
    assert non_domination_ranks([[0, 0], [1, 1], [0, 2], [2, 0], [2, 2]]) == [0, 1, 1, 1, 2]


def test_a_screen_is_promoted_only_among_the_best_share_after_the_grace():
    screening = Screening(promote=0.5, grace=3)
    assert screening.promoted([0.1, 9.0], [[0.1, 9.0]], DIRECTIONS)  # grace: the first screens all go on
    screens = [[0.9, 1.0], [0.8, 2.0], [0.5, 3.0], [0.95, 0.5]]
    assert screening.promoted([0.95, 0.5], screens, DIRECTIONS)  # dominates every other
    assert not screening.promoted([0.5, 3.0], screens, DIRECTIONS)  # dominated by all
    assert screening.promoted([0.9, 1.0], screens, DIRECTIONS)  # second front, best of it
    assert not screening.promoted([0.8, 2.0], screens, DIRECTIONS)


def test_a_screen_keeps_what_a_fine_tune_needs():
    screening = Screening(epochs=0.25)
    recipe = Recipe(task="t", finetune=FineTune(epochs=12))
    assert screening.screen(recipe).finetune.epochs == 3 and screening.screen(recipe).prune == recipe.prune
    two_rounds = Recipe(task="t", prune=Prune(rounds=2), finetune=FineTune(epochs=4))
    assert screening.screen(two_rounds).finetune.epochs == 2  # one epoch per round at least
    assert screening.screen(Recipe(task="t", quantize=Quantize(bits=4, qat=True), finetune=FineTune(epochs=1))) is None
    with pytest.raises(ConfigError, match="promote"):
        Screening(promote=0.0)


SPACE = """schema_version: 1
prune: {scope: local, sparsity: {low: 0.0, high: 0.9, step: 0.1}, criteria: [l1]}
finetune: {epochs: {low: 4, high: 8}, lr: {low: 2.9e-3, high: 3.1e-3}}  # a continuous value: no recipe twice
"""


def test_a_multi_fidelity_search_fronts_only_full_fidelity_trials(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    path = tmp_path / "s.yaml"
    path.write_text("schema_version: 1\nstudy_name: s\ntask: 'tests.tasks:fragile_bottleneck'\nspace: space.yaml\n"
                    "trials: 10\nsampler: random\nobjectives: {val_accuracy: maximize, size_bytes: minimize}\n"
                    "screening: {epochs: 0.25, promote: 0.34, grace: 2}\n"
                    + QUICK_MEASURE_YAML)
    study, trials = run_search(StudySpec.load(path), progress=False)
    states = [t.state.name for t in trials]
    assert len(trials) == 10 and "FAIL" not in states and states.count("PRUNED") >= 3 and "COMPLETE" in states
    for trial in trials:
        screen, recipe = trial.user_attrs["screen"], Recipe.from_dict(trial.user_attrs["recipe"])
        assert screen["epochs"] == -(-recipe.finetune.epochs // 4) < recipe.finetune.epochs
        if trial.state.name == "PRUNED":
            assert trial.user_attrs["fidelity"] == "screen" and "metrics" not in trial.user_attrs
        else:
            assert trial.user_attrs["fidelity"] == "full" and trial.values[0] == trial.user_attrs["metrics"][
                "val_accuracy"]
    full = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert {t.number for t in study.best_trials} <= full and set(front_table(study)["trial"]) <= full
    screened_out = next(t.number for t in trials if t.state.name == "PRUNED")
    with pytest.raises(AutocompError, match=f"trial {screened_out} is PRUNED"):
        export_recipe(study, screened_out, tmp_path / "r.yaml", "sqlite://")


def test_a_bad_screening_names_its_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("schema_version: 1\nstudy_name: s\ntask: digits\nspace: x.yaml\nscreening: {promote: 1.5}\n")
    with pytest.raises(ConfigError, match=r"study.screening.promote.*must be in \[0.01, 1.0\], but got 1.5"):
        StudySpec.load(path)
