from __future__ import annotations

import pytest
import torch

from autocomp.compress.facts import model_facts
from autocomp.errors import ConfigError
from autocomp.methods import recipe_from_dict
from autocomp.recipe import Distill, LayerPrune, Prune, Quantize, Recipe


def make_recipe() -> Recipe:
    layers = {"conv1": LayerPrune(0.25, "fpgm"), "fc1": LayerPrune(0.5, "taylor")}
    return Recipe(task="digits", prune=Prune(layers=layers, rounds=2, bn_penalty=1e-4),
                  quantize=Quantize(bits=8, activation_bits=8, calibration="entropy", per_channel=True),
                  distill=Distill(temperature=3.0, alpha=0.7), seed=3, provenance={"trial": 4})


def test_yaml_round_trip(tmp_path):
    recipe = make_recipe()
    recipe.save(tmp_path / "r.yaml")
    loaded = Recipe.load(tmp_path / "r.yaml")
    assert loaded == recipe
    assert loaded.to_dict()["schema_version"] == 1
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_quantization_aware_training_of_masked_weights_round_trips():
    recipe = Recipe(task="digits", prune=Prune(scope="global", granularity="weight", sparsity=0.5, regrow=0.1),
                    quantize=Quantize(bits=4, symmetric=False, qat=True))
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [
        ({"quantize": {"bits": 9}}, "recipe.quantize.bits", "must be one of [32, 16, 8, 7, 6, 5, 4, 3, 2], but got 9"),
        ({"quantize": {"bits": 4, "activation_bits": 8}}, "recipe.quantize.activation_bits", "needs bits 8"),
        ({"quantize": {"bits": 16, "activation_bits": 32, "kmeans": True}}, "recipe.quantize.kmeans", "bits 16"),
        ({"prune": {"layers": {"conv1": {"sparsity": 1.2}}}}, "recipe.prune.layers.conv1.sparsity",
         "must be in [0.0, 1.0)"),
        ({"prune": {"layers": {"conv1": {"criterion": "fpmg"}}}}, "recipe.prune.layers.conv1.criterion",
         "Did you mean 'fpgm'?"),
        ({"prune": {"scope": "globl"}}, "recipe.prune.scope", "Did you mean 'global'?"),
        ({"prune": {"rounds": 0}}, "recipe.prune.rounds", "got 0"),
        ({"prune": {"sparsity": 0.3}}, "recipe.prune.sparsity",  # local scope: it would prune nothing
         "must be 0 in scope 'local', where each entry of layers gives its own sparsity"),
        ({"prune": {"regrow": 0.2}}, "recipe.prune.regrow", "needs granularity 'weight'"),
        ({"quantize": {"layers": {"conv1": 4}, "activation_layers": {"conv1": 8}}},
         "recipe.quantize.activation_layers.conv1", "needs 8-bit weights, but the layer's weights have 4"),
        ({"prune": {"granularity": "weight", "criterion": "fpgm"}}, "recipe.prune.criterion", "single weights"),
        ({"quantize": {"bits": 32, "activation_bits": 32, "qat": True}}, "recipe.quantize.qat",
         "needs integer weights"),
        ({"distill": {"alpha": -0.1}}, "recipe.distill.alpha", "got -0.1"),
        ({"quantize": {"calibraton": "minmax"}}, "recipe.quantize.calibraton", "Did you mean 'calibration'?"),
        ({"finetune": {"epochs": "two"}}, "recipe.finetune.epochs", "must be of type int"),
        ({"finetune": {"patience": -1}}, "recipe.finetune.patience", "must be in [0, 1000], but got -1"),
        ({"schema_version": 7}, "recipe.schema_version", "got 7"),
        ({"prune": {"rounds": 3}}, "recipe.finetune.epochs", "must be >= 3, one for each of the 3 pruning rounds"),
        ({"quantize": {"qat": True}, "finetune": {"epochs": 0}}, "recipe.finetune.epochs",
         "and one to train with the quantizers in place (quantize.qat), but got 0"),
    ],
)
def test_bad_values_name_field_rule_and_value(patch, field, fragment):
    data = make_recipe().to_dict()
    for key, value in patch.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)  # the loader: the recipe's own rules, then the methods it names (autocomp.methods)
    assert err.value.field == field
    assert fragment in str(err.value)


def test_a_recipe_is_checked_against_the_models_layers(small_cnn):
    facts = model_facts(small_cnn, torch.zeros(1, 1, 8, 8))
    assert list(facts.prunable) == ["conv1", "conv2", "fc1"]  # the head fc2 is never pruned
    assert facts.layers == ["conv1", "conv2", "fc1", "fc2"]
    facts.check(make_recipe())
    with pytest.raises(ConfigError, match="Did you mean 'conv2'") as err:
        facts.check(Recipe(task="digits", prune=Prune(layers={"conv9": LayerPrune(0.5)})))
    assert err.value.field == "recipe.prune.layers.conv9"
    with pytest.raises(ConfigError, match="Did you mean 'fc2'") as err:
        facts.check(Recipe(task="digits", quantize=Quantize(bits=4, layers={"fc3": 8})))
    assert err.value.field == "recipe.quantize.layers.fc3"
    with pytest.raises(ConfigError, match="bn_scale"):  # fc1 has no BatchNorm to read gamma from
        facts.check(Recipe(task="digits", prune=Prune(layers={"fc1": LayerPrune(0.5, "bn_scale")})))
    with pytest.raises(ConfigError, match="no attention module"):
        facts.check(Recipe(task="digits", prune=Prune(heads=0.5)))


@pytest.mark.parametrize(("epochs", "rounds", "schedule"), [(5, 2, [3, 2]), (2, 2, [1, 1]), (4, 1, [4]), (0, 1, [0]),
                                                            (7, 3, [3, 2, 2])])
def test_the_fine_tune_schedule_gives_every_round_its_epochs(epochs, rounds, schedule):
    from autocomp.recipe import FineTune

    assert FineTune(epochs=epochs).schedule(rounds) == schedule
