"""A study opens with the hand-made pipeline's uniform policies, and with policies shaped by sensitivity."""

from __future__ import annotations

import optuna
import pytest
import torch

from autocomp.compress.prune import prunable_layers
from autocomp.search.warm_start import warm_start
from autocomp.sensitivity import Sensitivity, analyse
from autocomp.space import SearchSpace
from autocomp.tasks.digits import DigitsCNN
from tests.conftest import ROOT
from tests.tasks import fragile_bottleneck


@pytest.fixture(scope="module")
def digits_space():
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    prunable = prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    return space, prunable, space.dimensions(prunable, "digits")


def test_the_first_generation_is_the_uniform_policies(digits_space):
    space, prunable, dims = digits_space
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=6, seed=0))
    for policy in warm_start(dims, space.warm_start.levels):
        study.enqueue_trial(policy)
    recipes = []
    for _ in range(4):
        trial = study.ask()
        recipes.append(space.sample(trial, "digits", prunable))
        study.tell(trial, [0.0, 0.0])
    groups = {layer.group for layer in prunable.values()}
    for recipe, (level, int8) in zip(recipes, [(0.5, False), (0.5, True), (0.7, False), (0.7, True)], strict=True):
        p, q, d = recipe.prune, recipe.quantize, recipe.distill
        assert (p.scope, p.granularity, p.rounds, p.drop_blocks, p.bn_penalty) == ("local", "channel", 1, 0, 0.0)
        assert set(p.layers) == groups and {(e.sparsity, e.criterion) for e in p.layers.values()} == {(level, "l1")}
        assert (d.kind, d.alpha, d.temperature, recipe.finetune.epochs) == ("logits", 0.7, 4.0, 12)
        if int8:
            assert (q.activation_bits, q.bits, q.per_channel, q.calibration, q.qat) == (8, 8, True, "minmax", False)
            assert set(q.activation_layers.values()) == {8}
        else:
            assert (q.activation_bits, q.bits, q.layers, q.activation_layers) == (32, 32, {}, {})


def test_sensitivity_shapes_the_allocation_and_keeps_fragile_layers_fp32(digits_space):
    space, prunable, dims = digits_space
    groups = sorted({layer.group for layer in prunable.values()})
    fragile, robust = "conv1", "conv4"
    drop = {g: 0.3 if g == fragile else 0.0 if g == robust else 0.05 for g in groups}
    sensitivity = Sensitivity(0.9, {g: {"0.25": 0.9 - drop[g] / 2, "0.75": 0.9 - drop[g]} for g in groups},
                              {n: {"8": 0.7 if n == "fc1" else 0.9} for n in prunable})
    shaped = warm_start(dims, [0.5], sensitivity, {n: p.group for n, p in prunable.items()})[2:]
    assert len(shaped) == 2  # fp32 and int8 at level 0.5, after the two uniform ones
    for policy in shaped:
        assert policy[f"prune.{fragile}.share"] == 0.0 and policy[f"prune.{robust}.share"] == 1.5
    assert shaped[1]["quantize.fc1.activation_bits"] == 32 and shaped[1]["quantize.conv1.activation_bits"] == 8


def test_sensitivity_ranks_a_deliberately_fragile_layer_first(tmp_path):
    task = fragile_bottleneck()
    result = analyse(task, progress=False)
    assert result.baseline > 0.85
    assert set(result.prune) == {"wide1", "narrow", "wide2"} and set(result.quantize) == {"wide1", "narrow", "wide2",
                                                                                             "head"}
    ranked = sorted(result.prune, key=lambda g: -result.prune_drop(g, 0.5))
    assert ranked[0] == "narrow" and result.prune_drop("narrow", 0.5) > 3 * result.prune_drop("wide1", 0.5)
    assert all(result.quantize_drop(n, 2) >= result.quantize_drop(n, 8) - 0.01 for n in result.quantize)
    assert Sensitivity.from_dict(result.to_dict()) == result
    assert result.table().splitlines()[4].startswith("narrow")  # the table lists the most fragile first
    png = result.heat_map(tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
