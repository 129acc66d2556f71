"""A study opens with the hand-made pipeline's uniform policies, and with policies shaped by sensitivity."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
from torch import nn

from autocomp import sensitivity
from autocomp.allocation import Guide
from autocomp.compress.prune import prunable_layers
from autocomp.errors import ConfigError
from autocomp.narrowing import narrow_choices
from autocomp.search.warm_start import group_sizes, smaller_students, warm_start
from autocomp.sensitivity import Sensitivity, analyse
from autocomp.space import SearchSpace
from autocomp.tasks import Task
from autocomp.tasks.digits import DigitsCNN
from autocomp.train import Split
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
    levels = space.warm_start.levels
    assert levels == [0.5, 0.8]
    for recipe, (level, int8) in zip(recipes, [(lv, int8) for lv in levels for int8 in (False, True)], strict=True):
        p, q, d = recipe.prune, recipe.quantize, recipe.distill
        assert (p.scope, p.granularity, p.rounds, p.drop_blocks, p.heads, p.bn_penalty) == ("local", "channel", 1, 0,
                                                                                           0.0, 0.0)
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
    layer_groups = {n: p.group for n, p in prunable.items()}
    sizes = group_sizes(DigitsCNN(), layer_groups)
    assert sizes["conv1"] == 32 * 9 + 32 and sizes["fc1"] == 1024 * 256 + 256
    shaped = warm_start(dims, [0.5], sensitivity, layer_groups, sizes)[2:]
    assert len(shaped) == 2  # fp32 and int8 at level 0.5, after the two uniform ones
    for policy in shaped:  # the space's allocation: 0, 0.5, 1, 1.25, 1.5
        assert policy[f"prune.{fragile}.share"] == 0.5 and policy[f"prune.{robust}.share"] == 1.25
        # the same drop costs less per parameter in the large fc1 than in the small conv2
        assert policy["prune.fc1.share"] == 1.25 and policy["prune.conv2.share"] == 1.0
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


def test_a_teachers_map_is_analysed_once_and_read_by_every_later_study(teacher_cache, monkeypatch):
    task = fragile_bottleneck()
    first = sensitivity.cached(task, progress=False)
    monkeypatch.setattr(sensitivity, "analyse", lambda *a, **k: pytest.fail("analysed again"))
    assert sensitivity.cached(task, progress=False) == first
    monkeypatch.setattr(sensitivity, "analyse", lambda *a, **k: dataclasses.replace(first, baseline=0.0))
    assert sensitivity.cached(task, progress=False, recompute=True).baseline == 0.0
    other = dataclasses.replace(task, metric=lambda logits, labels: 0.5)  # another metric: another map
    assert sensitivity.cached(other, progress=False).baseline == 0.0


def test_a_policy_space_warm_starts_on_its_knobs():
    """Uniform: nothing follows the map and nothing is protected; by sensitivity: the policy's knobs at 1."""
    space = SearchSpace.load(ROOT / "search_spaces" / "compact.yaml")
    prunable = prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    dims = space.dimensions(prunable, "digits")
    groups = {name: layer.group for name, layer in prunable.items()}
    fake = Sensitivity(0.99, {g: {"0.5": 0.9} for g in set(groups.values())}, {})
    policies = warm_start(dims, [0.5, 0.8], fake, groups, dict.fromkeys(groups.values(), 1))
    assert len(policies) == 8
    for policy in policies[:4]:
        assert policy["policy.follow"] == 0.0 and policy["policy.protect"] == 10.0
    for policy in policies[4:]:
        assert policy["policy.follow"] == 1.0 and policy["policy.protect"] == 1.0
    assert all(not name.endswith(".share") for policy in policies for name in policy)


def test_a_warm_start_may_open_with_4_bit_weights_trained_with_qat(digits_space):
    space, prunable, dims = digits_space
    policies = warm_start(dims, [0.8], formats=("fp32", "int8", "int4"))
    recipes = [space.decode({name: policy.get(name, param.candidates()[0]) for name, param in dims.items()},
                            "digits", prunable) for policy in policies]
    assert [(r.quantize.bits, r.quantize.activation_bits, r.quantize.qat) for r in recipes] == [
        (32, 32, False), (8, 8, False), (4, 32, True)]
    assert recipes[2].quantize.layers == dict.fromkeys(prunable, 4)  # every layer at 4 bits, none left wider


def test_warm_start_students_decode_to_the_networks_named_unpruned_in_each_format():
    space = SearchSpace.load(ROOT / "search_spaces" / "compact.yaml")
    prunable = prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    dims = space.dimensions(prunable, "digits")
    students = space.warm_start.students
    assert [s.family for s in students] == ["cnn", "cnn", "cnn", "mlp"]
    policies = warm_start(dims, [], formats=("fp32", "int4"), students=students)
    groups = {name: layer.group for name, layer in prunable.items()}
    guide = Guide(Sensitivity(0.99, {g: {"0.5": 0.9} for g in set(groups.values())}, {}), {})
    recipes = [space.decode({name: policy.get(name, param.candidates()[0]) for name, param in dims.items()},
                            "digits", prunable, guide=guide) for policy in policies]
    assert [r.student for r in recipes] == [s for s in students for _ in range(2)]
    assert [(r.quantize.bits, r.quantize.qat) for r in recipes] == [(32, False), (4, True)] * 4
    assert all(r.prune.layers == {} and r.student.init == "scratch" for r in recipes)
    assert {r.finetune.lr for r in recipes} == {3e-3}  # from scratch: the space's highest learning rate
    teacher = warm_start(dims, [0.5], formats=("int4",))[0]
    assert space.decode({name: teacher.get(name, param.candidates()[0]) for name, param in dims.items()},
                        "digits", prunable, guide=guide).finetune.lr == 1e-3  # a fine-tune: the hand-made rate
    narrow_choices(space, "student", "family", "cnn", "cannot take", "digits")  # a task the CNNs do not fit
    narrowed = warm_start(space.dimensions(prunable, "digits"), [], formats=("int4",), students=students)
    assert [policy["student.family"] for policy in narrowed] == ["mlp"]


def test_a_warm_start_student_must_be_a_new_network():
    with pytest.raises(ConfigError, match=r"`space.warm_start.students\[0\].family` must be a new network"):
        SearchSpace.from_dict({"schema_version": 1, "warm_start": {"students": [{"family": "teacher"}]}})


@pytest.mark.parametrize("hidden, kept", [(0, []), (4096, ["cnn", "cnn", "cnn", "mlp"])], ids=["small", "large"])
def test_a_warm_start_student_larger_than_the_teacher_is_left_out(hidden, kept):
    x = torch.zeros(4, 1, 8, 8)
    layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)] if hidden else [nn.Linear(64, 10)]
    data = Split(x, torch.zeros(4, dtype=torch.long))
    task = Task("t", nn.Sequential(nn.Flatten(), *layers).eval(), data, data, data, x[:1], students=("cnn", "mlp"))
    students = SearchSpace.load(ROOT / "search_spaces" / "compact.yaml").warm_start.students
    assert [s.family for s in smaller_students(students, task)] == kept
