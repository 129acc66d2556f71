from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
import yaml
from torch import nn

from autocomp.allocation import Guide
from autocomp.compress.facts import ModelFacts, model_facts
from autocomp.compress.prune import prunable_layers
from autocomp.dimensions import layer_dimension, per_layer
from autocomp.errors import ConfigError
from autocomp.recipe import Distill, FineTune, Prune, Recipe
from autocomp.search.trials import make_sampler, narrow_to_model
from autocomp.sensitivity import Sensitivity
from autocomp.space import SearchSpace
from autocomp.study import StudySpec
from autocomp.tasks import Task
from autocomp.tasks.digits import DigitsCNN
from autocomp.train import Split
from tests.conftest import ROOT
from tests.zoo import Encoder, TabularMLP


def layer_facts(model: nn.Module) -> ModelFacts:
    """The model's facts, with as many residual blocks and attention modules as a space may ask to drop: these tests
    check the layers a sampled recipe names (a study narrows drop_blocks and heads to its model, narrow_to_model)."""
    facts = model_facts(model, torch.zeros(1, 1, 8, 8))
    return dataclasses.replace(facts, blocks=[f"block{i}" for i in range(16)], attention=["attention"])


def test_joint_space_samples_valid_recipes_on_fixed_dimensions(small_cnn):
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    facts = layer_facts(small_cnn)
    prunable = facts.prunable
    free = {name for name, param in space.dimensions(prunable, "digits").items() if not param.fixed}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recipes = []
    for _ in range(400):
        trial = study.ask()
        recipe = space.sample(trial, "digits", prunable, seed=1)
        facts.check(recipe)
        assert Recipe.from_dict(recipe.to_dict()) == recipe  # valid by the Recipe's own rules
        assert set(trial.params) == free  # every trial samples every dimension, used or not
        p, q, values = recipe.prune, recipe.quantize, trial.params
        level = values["prune.sparsity"]
        if recipe.student.family != "teacher":  # a new network from scratch: its widths are its knobs
            assert p == Prune()
        elif p.scope == "local":  # one level, allocated by each group's share, capped at the range's top
            named = set(prunable) if p.granularity == "weight" else {layer.group for layer in prunable.values()}
            assert set(p.layers) == named and p.sparsity == 0.0
            for name, layer in p.layers.items():
                assert layer.sparsity == pytest.approx(min(level * values[f"prune.{name}.share"], 0.85))
                assert layer.criterion == values["prune.criterion"] or values["prune.criterion"] not in \
                    prunable[name].criteria(p.granularity)
        else:
            assert not p.layers and p.sparsity == pytest.approx(level) and p.min_keep == values["prune.min_keep"]
        if q.activation_bits == 8:  # static int8 sets 8-bit weights whatever `quantize.bits` drew
            assert q.bits == 8 and q.calibration == values["quantize.calibration"]
        if recipe.student.family != "teacher":  # a new network: the teacher's layer names are not its own
            assert not q.layers and not q.activation_layers
        lowest = min([q.bits, *q.layers.values()])
        if lowest <= 4 and q.bits <= 8 and not q.kmeans:
            assert q.qat  # low bit widths train with QAT
        assert recipe.finetune.epochs >= max(values["finetune.epochs"], math.ceil(level * 12 - 1e-9), p.rounds)
        study.tell(trial, 0.0)
        recipes.append(recipe)
    local = [r.prune.layers for r in recipes if r.prune.scope == "local" and r.prune.granularity == "channel"
             and r.student.family == "teacher"]
    assert {r.quantize.bits for r in recipes} == {32, 16, 8, 4, 2}
    assert any(r.quantize.activation_bits == 8 for r in recipes) and any(r.quantize.kmeans for r in recipes)
    assert {r.prune.scope for r in recipes} == {"local", "global"} and {r.prune.rounds for r in recipes} == {1, 2}
    assert {r.prune.granularity for r in recipes} == {"channel", "weight"}
    weight_criteria = {c for r in recipes if r.prune.granularity == "weight"
                       for c in [r.prune.criterion, *(layer.criterion for layer in r.prune.layers.values())]}
    assert weight_criteria <= {"l1", "l2", "taylor", "lamp", "random"}
    assert {r.distill.kind for r in recipes} == {"none", "logits", "fitnet", "attention", "rkd", "sp",
                                                 "attention_matrix", "hidden"}
    assert {r.student.family for r in recipes} == {"teacher", "cnn", "mlp", "transformer"}
    mixed = [r.quantize.layers for r in recipes if r.quantize.layers]
    assert mixed and all(set(layers) == set(prunable) for layers in mixed)  # quantizable defaults to prunable
    assert all(r.quantize.activation_bits == 32 and r.quantize.bits <= 16 for r in recipes if r.quantize.layers)
    int8 = [r.quantize.activation_layers for r in recipes  # per-layer kernels, on the teacher's graph
            if r.quantize.activation_bits == 8 and r.student.family == "teacher"]
    assert int8 and all(set(layers) == set(prunable) for layers in int8)
    assert any(set(layers.values()) == {8, 32} for layers in int8)
    assert all(not r.quantize.activation_layers for r in recipes if r.quantize.activation_bits == 32)
    assert all(layers["fc1"].criterion != "bn_scale" for layers in local)
    assert any(layers["conv1"].criterion == "bn_scale" for layers in local)
    assert any(layers["conv1"].sparsity == 0.0 < layers["conv2"].sparsity for layers in local)  # share 0: kept


def small_guide() -> Guide:
    """A sensitivity map of ``SmallCNN``: conv1 fragile when pruned, fc1 free, conv2 between; conv1 costs 5 points
    on int8 kernels, fc1 nothing at 2 bits, conv2 3 points at 2 bits and 0.5 at 4."""
    prune = {"conv1": {"0.25": 0.7, "0.5": 0.5, "0.75": 0.2}, "conv2": {"0.25": 0.9, "0.5": 0.85, "0.75": 0.7},
             "fc1": {"0.25": 0.95, "0.5": 0.95, "0.75": 0.94}}
    quantize = {"conv1": {"8": 0.9, "4": 0.8, "2": 0.3}, "conv2": {"8": 0.95, "4": 0.945, "2": 0.92},
                "fc1": {"8": 0.95, "4": 0.95, "2": 0.95}, "fc2": {"8": 0.95, "4": 0.95, "2": 0.9}}
    return Guide(Sensitivity(0.95, prune, quantize), {"conv1": 1000, "conv2": 5000, "fc1": 9000})


def test_the_compact_space_derives_per_layer_choices_from_the_sensitivity_map(small_cnn):
    space = SearchSpace.load(ROOT / "search_spaces" / "compact.yaml")
    prunable = prunable_layers(small_cnn, torch.zeros(1, 1, 8, 8))
    layers = ["conv1", "conv2", "fc1", "fc2"]
    dims = space.dimensions(prunable, "digits", layers)
    free = [name for name, param in dims.items() if not param.fixed]
    compression = [name for name in free if not name.startswith("student.")]  # a new network's own knobs apart
    assert len(compression) <= 12 and not any(set(name.split(".")) & {*layers, "share"} for name in free)
    guide = small_guide()
    base = {name: param.candidates()[0] for name, param in dims.items()}

    def decode(**values):
        return space.decode(base | {k.replace("__", "."): v for k, v in values.items()}, "digits", prunable,
                            quantizable=layers, guide=guide)

    uniform = decode(prune__sparsity=0.6, policy__follow=0.0)
    assert {name: layer.sparsity for name, layer in uniform.prune.layers.items()} == dict.fromkeys(guide.sizes, 0.6)
    followed = decode(prune__sparsity=0.6, policy__follow=1.0).prune.layers
    assert followed["conv1"].sparsity < followed["conv2"].sparsity < 0.6 < followed["fc1"].sparsity  # fragile kept
    mean = sum(guide.sizes[g] * layer.sparsity for g, layer in followed.items()) / sum(guide.sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-3)  # the level keeps its meaning: the parameters removed
    stronger = decode(prune__sparsity=0.6, policy__follow=2.0).prune.layers
    assert stronger["conv1"].sparsity < followed["conv1"].sparsity
    assert decode(prune__sparsity=0.9, policy__follow=2.0).prune.layers["fc1"].sparsity == 0.95  # the range's top
    int8 = decode(quantize__activation_bits=8, policy__protect=1.0).quantize
    assert int8.bits == 8 and int8.activation_layers == {"conv1": 32}  # 5 points on int8 kernels: fp32
    assert decode(quantize__activation_bits=8, policy__protect=10.0).quantize.activation_layers == {}
    two = decode(quantize__activation_bits=32, quantize__bits=2, policy__protect=1.0).quantize
    assert two.bits == 2 and two.qat and two.layers == {"conv1": 32, "conv2": 4, "fc2": 4}
    with pytest.raises(ConfigError, match="sensitivity map"):
        space.decode(base, "digits", prunable, quantizable=layers)


def test_a_policy_and_per_layer_dimensions_exclude_each_other():
    with pytest.raises(ConfigError, match="cannot also search") as err:
        SearchSpace.from_dict({"schema_version": 1, "prune": {"allocation": [0.5, 1.0]}, "policy": {"follow": 1.0}})
    assert err.value.field == "space.policy"


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_samplers_learn_every_dimension(small_cnn, path, sampler):
    """NSGA-II and TPE (without ``group``) evolve only the intersection of the trials' parameters: it must
    hold every free dimension of a shipped space after 20 trials."""
    space = SearchSpace.load(path)
    facts = layer_facts(small_cnn)
    prunable = facts.prunable
    free = {name for name, param in space.dimensions(prunable, "digits").items() if not param.fixed}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(
        StudySpec("s", "digits", str(path), sampler=sampler, population_size=4), seed=0))
    for _ in range(20):
        trial = study.ask()
        recipe = space.sample(trial, "digits", prunable, guide=small_guide())
        study.tell(trial, [trial.params.get("prune.sparsity", 0.0), recipe.quantize.bits])
    trial = study.ask()
    assert set(study.sampler.infer_relative_search_space(study, trial)) == free


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [
        ({"prune": {"sparsity": {"low": 0.6, "high": 0.2}}}, "space.prune.sparsity", "`low <= high` must hold"),
        ({"prune": {"sparsity": {"low": 0.0, "high": 1.5}}}, "space.prune.sparsity", "must be in [0.0, 1.0)"),
        ({"prune": {"criteria": ["l1", "apoz_typo"]}}, "space.prune.criteria", "apoz_typo"),
        ({"quantize": {"bits": [32, 9]}}, "space.quantize.bits", "got 9"),
        ({"quantize": {"calibration": ["minmax", "entropi"]}}, "space.quantize.calibration",
         "Did you mean 'entropy'?"),
        ({"finetune": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, "space.finetune.lr", "log range"),
        ({"finetune": {"patience": [0, -1]}}, "space.finetune.patience", "got -1"),
        ({"distil": {}}, "space.distil", "Did you mean 'distill'?"),
    ],
)
def test_bad_spaces_are_rejected_when_loaded(tmp_path, patch, field, fragment):
    data = yaml.safe_load((ROOT / "search_spaces" / "joint.yaml").read_text())
    for key, value in patch.items():
        data[key] = {**data.get(key, {}), **value}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        SearchSpace.load(tmp_path / "space.yaml")
    assert err.value.field == field
    assert fragment in str(err.value)


def test_unknown_layer_in_space(small_cnn):
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {"layers": ["conv1", "cnv2"]}})
    with pytest.raises(ConfigError, match="Did you mean 'conv2'"):
        space.layer_names(prunable_layers(small_cnn, torch.zeros(1, 1, 8, 8)), "digits")


def test_values_that_do_not_apply_are_ignored(small_cnn):
    prunable = prunable_layers(small_cnn, torch.zeros(1, 1, 8, 8))
    space = SearchSpace.from_dict({"schema_version": 1, "quantize": {"bits": 32, "calibration": ["minmax", "entropy"]},
                                   "distill": {"alpha": [0.0], "temperature": {"low": 1.0, "high": 4.0}}})
    trial = optuna.create_study().ask()
    recipe = space.sample(trial, "digits", prunable)
    assert set(trial.params) == {"quantize.calibration", "distill.temperature"}  # sampled in every trial
    assert (recipe.quantize.bits, recipe.quantize.calibration, recipe.distill.alpha) == (32, "minmax", 0.0)
    assert recipe.distill.temperature == Distill().temperature  # alpha 0: the temperature is not used


def test_a_space_fixes_or_searches_the_fine_tunes_patience(small_cnn, tmp_path):
    prunable = prunable_layers(small_cnn, torch.zeros(1, 1, 8, 8))
    (tmp_path / "space.yaml").write_text("schema_version: 1\nfinetune: {epochs: 12, patience: 3}\n")
    recipe = SearchSpace.load(tmp_path / "space.yaml").sample(optuna.create_study().ask(), "digits", prunable)
    assert recipe.finetune == FineTune(epochs=12, patience=3)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    space = SearchSpace.from_dict({"schema_version": 1, "finetune": {"patience": [0, 2, 5]}})
    values = {name: param.candidates()[0] for name, param in space.dimensions(prunable, "digits").items()}
    assert space.decode({**values, "finetune.patience": 5}, "digits", prunable).finetune.patience == 5


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_loads_and_samples_valid_recipes(small_cnn, path):
    space = SearchSpace.load(path)
    facts = layer_facts(small_cnn)
    prunable = facts.prunable
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        recipe = space.sample(trial, "digits", prunable, guide=small_guide())
        facts.check(recipe)
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        study.tell(trial, 0.0)


@pytest.mark.parametrize(("granularity", "named"), [
    ("channel", ["conv1", "conv2", "conv3", "conv4", "fc1"]),  # conv3 names its group with block.body.0
    ("weight", ["conv1", "conv2", "conv3", "block.body.0", "conv4", "fc1"]),  # masks are per layer
])
def test_local_scope_prunes_each_pruning_group_once(granularity, named):
    prunable = prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {
        "granularity": granularity, "sparsity": [0.4, 0.8], "allocation": [0.5, 1.0], "criteria": ["l1", "l2"]}})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    recipe = space.sample(trial, "digits", prunable)
    layer_facts(DigitsCNN()).check(recipe)
    assert list(recipe.prune.layers) == named
    assert [k for k in trial.params if k.endswith(".share")] == [f"prune.{n}.share" for n in prunable]
    level = trial.params["prune.sparsity"]
    assert [layer.sparsity for layer in recipe.prune.layers.values()] == [
        pytest.approx(level * trial.params[f"prune.{n}.share"]) for n in named]


@pytest.mark.parametrize(("model", "x", "narrowed"), [
    (DigitsCNN(), torch.zeros(1, 1, 8, 8), {"heads": [0.0], "kind": ["attention_matrix"]}),
    (Encoder(norm_first=True), torch.zeros(1, 8, 8), {"drop_blocks": [0]}),
    (TabularMLP(), torch.zeros(1, 30), {"drop_blocks": [0], "heads": [0.0], "kind": ["attention_matrix", "hidden"],
                                        "family": ["cnn", "transformer"]}),  # a table: no conv or patch student
], ids=["residual CNN", "transformer", "MLP"])
def test_the_shipped_space_is_narrowed_to_what_each_model_can_use(model, x, narrowed):
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    kinds = space.sections["distill"]["kind"].candidates()
    data = Split(x, torch.zeros(1, dtype=torch.long))
    lines = narrow_to_model(space, Task("m", model.eval(), data, data, data, x), "m")
    sections = {"kind": "distill", "family": "student"}  # one line per narrowing: per choice taken out of these
    assert [line.split(" ")[0] for line in lines] == [
        f"space.{sections.get(key, 'prune')}.{key}" for key, values in narrowed.items()
        for _ in (values if key in sections else [key])]
    assert space.sections["distill"]["kind"].candidates() == [k for k in kinds if k not in narrowed.get("kind", [])]
    for key in ("drop_blocks", "heads"):
        if key in narrowed:
            assert space.pruning[key].candidates() == narrowed[key]
    fixed = SearchSpace.from_dict({"schema_version": 1, "distill": {"kind": "attention_matrix"}})  # written: refused
    if "kind" in narrowed:
        with pytest.raises(ConfigError, match="cannot be 'attention_matrix'") as err:
            narrow_to_model(fixed, Task("m", model.eval(), data, data, data, x), "m")
        assert err.value.field == "space.distill.kind"


def test_every_per_layer_dimension_names_its_layer_and_rule():
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    prunable = prunable_layers(DigitsCNN(), torch.zeros(1, 1, 8, 8))
    found = [per_layer(name) for name in space.dimensions(prunable, "digits")]
    for rule, layers in [("share", space.layer_names(prunable, "digits")), ("bits", prunable),
                         ("activation_bits", prunable)]:
        assert sorted(layer for layer, r in filter(None, found) if r == rule) == sorted(layers)
    assert per_layer(layer_dimension("quantize", "blocks.0.conv", "bits")) == ("blocks.0.conv", "bits")
    assert per_layer("prune.sparsity") is None and per_layer("student.cnn.width.1") is None


def test_nas_kd_searches_the_distillation_mode_in_every_trial_and_a_mode_with_its_own_loss_uses_logits():
    space = SearchSpace.load(ROOT / "search_spaces" / "nas_kd.yaml")
    model, x = DigitsCNN().eval(), torch.zeros(1, 1, 8, 8)
    data = Split(x, torch.zeros(1, dtype=torch.long))
    lines = narrow_to_model(space, Task("m", model, data, data, data, x), "m")
    assert [line for line in lines if "distill.mode" in line] == [
        "space.distill.mode narrowed from ['offline', 'multi_teacher', 'born_again', 'mutual', 'self', 'assistant'] "
        "to ['offline', 'born_again', 'mutual', 'self', 'assistant']: the 'm' model gives no extra teachers "
        "(Task.teachers), nor does the space (distill.teachers)"]
    prunable = prunable_layers(model, x)
    assert "distill.mode" in space.dimensions(prunable, "digits")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        recipe = space.sample(trial, "digits", prunable)
        assert recipe.distill.mode == trial.params["distill.mode"] and "distill.kind" in trial.params
        if recipe.distill.mode != "offline":
            assert recipe.distill.kind == "logits"
        else:
            assert recipe.distill.kind == trial.params["distill.kind"]
        seen.add(recipe.distill.mode)
    assert seen == {"offline", "born_again", "mutual", "self", "assistant"}
    teachers = SearchSpace.load(ROOT / "search_spaces" / "nas_kd.yaml")
    given = Task("m", model, data, data, data, x, teachers=(DigitsCNN().eval(),))
    assert not [line for line in narrow_to_model(teachers, given, "m") if "distill.mode" in line]
