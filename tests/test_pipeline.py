from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from autocomp import runtime
from autocomp.compress.facts import teacher_facts
from autocomp.compress.prune import prunable_layers
from autocomp.errors import ConfigError
from autocomp.features import layer_names
from autocomp.methods import check_recipe
from autocomp.pipeline import apply, student_counts, teacher_baseline
from autocomp.recipe import Distill, FineTune, LayerPrune, Prune, Quantize, Recipe, Student
from autocomp.tasks import Task
from tests.conftest import QUICK_MEASURE
from tests.tasks import plateau


def teacher_metrics(task, out_dir) -> dict[str, float]:
    return teacher_baseline(task, QUICK_MEASURE, out_dir).metrics


def recipe(bits: int) -> Recipe:
    layers = {"conv2": LayerPrune(0.5, "fpgm"), "conv4": LayerPrune(0.5, "taylor"), "fc1": LayerPrune(0.75, "l1")}
    return Recipe(task="digits", prune=Prune(layers=layers),
                  quantize=Quantize(bits=bits, activation_bits=min(bits, 32), calibration="percentile"),
                  finetune=FineTune(epochs=2), measure=QUICK_MEASURE)


def test_apply_measures_the_artifact_itself(digits_task, tmp_path):
    result = apply(recipe(8), digits_task, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "recipe.yaml"]
    assert result.metrics["size_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert Recipe.load(tmp_path / "recipe.yaml") == check_recipe(recipe(8))  # as applied: its student resolved
    # the file alone reproduces the recorded accuracy
    logits = runtime.run(runtime.session(tmp_path / "model.onnx"), digits_task.test.x.numpy())
    assert np.mean(logits.argmax(1) == digits_task.test.y.numpy()) == result.metrics["test_accuracy"]
    assert result.metrics["test_accuracy"] > 0.9
    assert result.model.conv2.out_channels == 32 and result.model.fc1.out_features == 64
    assert result.epochs == [2]  # no patience: the whole fine-tune


def test_apply_is_deterministic_and_compresses(digits_task, tmp_path):
    first = apply(recipe(32), digits_task, tmp_path / "a", progress=False).metrics
    again = apply(recipe(32), digits_task, tmp_path / "b", progress=False).metrics
    keys = ("val_accuracy", "test_accuracy", "size_bytes", "macs", "params")
    assert [first[k] for k in keys] == [again[k] for k in keys]
    teacher = teacher_metrics(digits_task, tmp_path / "t")
    assert teacher["params"] > 500_000
    assert first["size_bytes"] < 0.5 * teacher["size_bytes"]  # removed channels really shrink the file
    assert first["macs"] < teacher["macs"] and first["params"] < teacher["params"]


def test_early_stopping_ends_each_rounds_fine_tune_on_a_validation_plateau(tmp_path):
    task = plateau()  # 100% validation accuracy from the first epoch on
    scored = []
    task.score = lambda model, split: scored.append(split) or Task.score(task, model, split)
    r = Recipe(task="plateau", prune=Prune(scope="global", sparsity=0.25, rounds=2), distill=Distill(kind="none"),
               finetune=FineTune(epochs=20, lr=1e-2, batch_size=16, patience=2), measure=QUICK_MEASURE)
    result = apply(r, task, tmp_path, progress=False)
    assert result.epochs == [3, 3]  # of the schedule's [10, 10]: the best epoch, then two without improvement
    assert len(scored) == 6 and all(split is task.val for split in scored)  # ranked on validation, never test
    assert result.metrics["val_accuracy"] == 1.0


def test_network_slimming_penalty_shrinks_batchnorm_scales(digits_task, tmp_path):
    def mean_gamma(penalty: float) -> float:
        r = Recipe(task="digits", prune=Prune(scope="global", sparsity=0.3, criterion="bn_scale", rounds=2,
                                              bn_penalty=penalty), finetune=FineTune(epochs=4, lr=1e-2),
                   measure=QUICK_MEASURE)
        model = apply(r, digits_task, tmp_path / str(penalty), progress=False).model
        return float(torch.cat([m.weight.abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]).mean())

    assert mean_gamma(0.1) < 0.8 * mean_gamma(0.0)


def test_quantization_aware_fine_tune_deploys_int8(digits_task, tmp_path):
    r = recipe(8)
    r.quantize.qat = True
    result = apply(r, digits_task, tmp_path, progress=False)
    assert result.metrics["test_accuracy"] > 0.9
    assert not any(m._forward_pre_hooks for m in result.model.modules())  # the fake quantizers are gone
    ops = {node.op_type for node in __import__("onnx").load(str(result.artifact)).graph.node}
    assert "QuantizeLinear" in ops


def test_a_student_from_scratch_learns_in_fp32_before_its_int8_quantizers_are_calibrated(digits_task, tmp_path):
    """QAT calibrates its int8 input ranges when it starts: on a network from scratch, from random weights. Those
    ranges clipped what it learnt, and such students ended at 10-19% (chance) in searches; trained half in fp32
    first, it learns as a student without QAT does."""
    student = Student(family="cnn", config={"depth": [2, 1], "width": [32, 16], "residual": True,
                                            "head": "flatten"}, init="scratch")
    r = Recipe(task="digits", student=student, distill=Distill(kind="fitnet", alpha=0.7),
               quantize=Quantize(bits=8, activation_bits=8, per_channel=True, calibration="percentile", qat=True),
               finetune=FineTune(epochs=8), measure=QUICK_MEASURE)
    result = apply(r, digits_task, tmp_path, progress=False)
    assert result.epochs == [8] and result.metrics["val_accuracy"] > 0.8, result.metrics["val_accuracy"]


@pytest.mark.parametrize("quantize", [
    Quantize(bits=16), Quantize(bits=8, per_channel=True), Quantize(bits=4, kmeans=True),
    Quantize(bits=4, symmetric=False, qat=True), Quantize(bits=2, per_channel=True, qat=True),
    Quantize(bits=8, per_channel=True, qat=True, layers={"conv1": 32, "conv4": 4, "fc1": 4}),
], ids=["fp16", "int8-weights", "kmeans4", "qat4-asym", "qat2", "mixed"])
def test_weight_only_recipes_deploy_smaller_files_that_reproduce(digits_task, tmp_path, quantize):
    r = Recipe(task="digits", quantize=quantize, finetune=FineTune(epochs=1), measure=QUICK_MEASURE)
    result = apply(r, digits_task, tmp_path, progress=False)
    teacher = teacher_metrics(digits_task, tmp_path / "t")
    stored = 16 if quantize.bits == 16 else 2 if quantize.bits == 2 else 4 if quantize.bits == 4 else 8
    assert result.metrics["size_bytes"] < teacher["size_bytes"] * (stored / 32 + 0.05)
    assert result.metrics["test_accuracy"] > (0.9 if quantize.bits >= 4 else 0.5)
    assert "QLinearConv" not in result.kernels  # no int8 kernel for weight-only quantization: fp32 convolutions
    convs = sum(isinstance(m, nn.Conv2d) for m in digits_task.teacher.modules())
    assert result.kernels.get("FusedConv", 0) + result.kernels.get("Conv", 0) == convs
    logits = runtime.run(runtime.session(result.artifact), digits_task.test.x.numpy())
    assert np.mean(logits.argmax(1) == digits_task.test.y.numpy()) == result.metrics["test_accuracy"]


def test_unstructured_sparse_training_deploys_a_sparse_file(digits_task, tmp_path):
    r = Recipe(task="digits", prune=Prune(scope="global", granularity="weight", sparsity=0.8, criterion="lamp",
                                          regrow=0.1), finetune=FineTune(epochs=3), measure=QUICK_MEASURE)
    result = apply(r, digits_task, tmp_path, progress=False)
    teacher = teacher_metrics(digits_task, tmp_path / "t")
    assert result.metrics["size_bytes"] < 0.4 * teacher["size_bytes"]
    assert result.metrics["macs"] == teacher["macs"]  # masked weights are still multiplied: no fewer MACs
    assert result.metrics["test_accuracy"] > 0.9
    weights = [m.weight for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(int((w == 0).sum()) for w in weights) > 0.7 * sum(w.numel() for w in weights)
    logits = runtime.run(runtime.session(result.artifact), digits_task.test.x.numpy())
    assert np.mean(logits.argmax(1) == digits_task.test.y.numpy()) == result.metrics["test_accuracy"]


def test_quantization_aware_sparse_training_deploys_the_masked_weights(digits_task, tmp_path):
    prunable = prunable_layers(digits_task.teacher, digits_task.example_input)
    r = Recipe(task="digits", prune=Prune(granularity="weight", regrow=0.1,
                                          layers={name: LayerPrune(0.5, "l1") for name in prunable}),
               quantize=Quantize(bits=4, symmetric=False, per_channel=True, qat=True), finetune=FineTune(epochs=2),
               measure=QUICK_MEASURE)
    result = apply(r, digits_task, tmp_path, progress=False)
    logits = runtime.run(runtime.session(result.artifact), digits_task.test.x.numpy())
    assert np.mean(logits.argmax(1) == digits_task.test.y.numpy()) == result.metrics["test_accuracy"] > 0.9
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(result.artifact)).graph.initializer}
    for name in prunable:
        w = result.model.get_submodule(name).weight.detach().numpy()  # (C_out, ...), as the artifact lays it out
        assert (w == 0).mean() >= 0.5  # as sparse as asked (a regrown weight that got no gradient stays 0)
        if f"{name}.weight_bits" in stored:  # stored sparsely: a pruned weight is no kept code, it decodes to 0
            kept = np.unpackbits(stored[f"{name}.weight_bits"], bitorder="little")[: w.size].astype(bool)
            assert not kept[w.ravel() == 0].any()
        else:  # stored densely (a layer too small for a bitmask to pay): each pruned weight is its zero point
            zero_point = stored[f"{name}.weight_zp"].reshape(-1, *[1] * (w.ndim - 1))
            assert np.all((stored[f"{name}.weight_q"].astype(np.float32) == zero_point)[w == 0])
    assert any(f"{name}.weight_bits" in stored for name in prunable)


def test_dropping_the_residual_block_removes_its_work(digits_task, tmp_path):
    layers = {"block.body.0": LayerPrune(0.5), "conv4": LayerPrune(0.5)}  # the first goes with its block
    r = Recipe(task="digits", prune=Prune(drop_blocks=1, layers=layers), finetune=FineTune(epochs=1),
               measure=QUICK_MEASURE)
    result = apply(r, digits_task, tmp_path, progress=False)
    teacher = teacher_metrics(digits_task, tmp_path / "t")
    assert isinstance(result.model.block, nn.Identity) and result.model.conv4.out_channels == 128
    block_macs = 128 * 128 * 9 * 16  # the block's 3x3 conv on a 4x4 map
    assert result.metrics["macs"] < teacher["macs"] - block_macs
    assert result.metrics["test_accuracy"] > 0.9


@pytest.mark.parametrize(("prune", "quantize", "epochs"), [
    (Prune(), Quantize(bits=8, activation_bits=8), 1),
    (Prune(layers={"conv2": LayerPrune(0.5)}, rounds=2), Quantize(bits=4, per_channel=True), 2),
    (Prune(scope="global", granularity="weight", sparsity=0.5, regrow=0.1, rounds=2), Quantize(bits=4), 3),
    (Prune(), Quantize(bits=8, activation_bits=8, layers={"fc1": 4}, activation_layers={"conv1": 32}), 1),
], ids=["int8", "rounds2-int4", "masked-regrow-int4", "mixed"])
def test_quantization_aware_training_changes_the_weights_of_every_recipe_that_asks(digits_task, tmp_path, prune,
                                                                                      quantize, epochs):
    def weights(qat: bool) -> dict[str, torch.Tensor]:
        r = Recipe(task="digits", prune=prune, quantize=dataclasses.replace(quantize, qat=qat),
                   finetune=FineTune(epochs=epochs), measure=QUICK_MEASURE)
        return apply(r, digits_task, tmp_path / str(qat), progress=False).model.state_dict()

    ptq, qat = weights(False), weights(True)
    changed = [k for k in ptq if k.endswith("weight") and not torch.equal(ptq[k], qat[k])]
    trained = [k for k in ptq if k.endswith("weight") and ptq[k].dim() > 1]  # Conv/Linear weights
    assert set(trained) <= set(changed)  # QAT ran in the last fine-tune and moved every layer's weights


def test_the_teachers_facts_are_found_once_per_teacher(digits_task):
    facts = teacher_facts(digits_task)
    assert teacher_facts(dataclasses.replace(digits_task, name="again")) is facts  # the same teacher object
    assert facts.prunable == prunable_layers(digits_task.teacher, digits_task.example_input)
    assert facts.blocks == ["block"] and facts.attention == [] and "fc1" in facts.layers
    other = dataclasses.replace(digits_task, teacher=type(digits_task.teacher)().eval())
    assert teacher_facts(other) is not facts


@pytest.mark.parametrize("student", [
    Student("cnn", {"depth": [1, 2], "width": [16, 32], "residual": True, "depthwise": True}),
    Student("transformer", {"layers": 1, "heads": 2, "width": 16, "patch": 2}),
    Student("teacher", {"depth": 0.0, "width": 0.5}, init="scratch"),
])
def test_a_student_recipe_replays_to_the_same_architecture_and_numbers(digits_task, tmp_path, student):
    made = Recipe(task="digits", student=student, prune=Prune(scope="global", sparsity=0.2),
                  quantize=Quantize(bits=8, activation_bits=8), distill=Distill(kind="sp"),
                  finetune=FineTune(epochs=4, lr=1e-2), measure=QUICK_MEASURE)
    first = apply(made, digits_task, tmp_path / "a", progress=False)
    replayed = apply(Recipe.load(tmp_path / "a" / "recipe.yaml"), digits_task, tmp_path / "b", progress=False)
    shapes = {name: tuple(t.shape) for name, t in first.model.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in replayed.model.state_dict().items()}
    keys = ("val_accuracy", "test_accuracy", "size_bytes", "params")
    assert [first.metrics[k] for k in keys] == [replayed.metrics[k] for k in keys]
    assert first.metrics["val_accuracy"] > 0.2  # four epochs from scratch: 0.28-0.98 here (chance: 0.1)
    teacher = teacher_facts(digits_task)
    assert first.metrics["params"] < 0.5 * sum(p.numel() for p in digits_task.teacher.parameters())
    assert set(teacher.layers) != set(layer_names(first.model)) or student.family == "teacher"


@pytest.mark.parametrize("mode", [
    Distill(mode="offline"),
    Distill(mode="multi_teacher", teachers=["tests.tasks:digits_linear"]),
    Distill(mode="born_again", generations=2),
    Distill(mode="mutual", peers=1),
    Distill(mode="self"),
    Distill(mode="assistant", assistant=Student("cnn", {"depth": [1], "width": [16]}), assistant_epochs=2),
], ids=lambda d: d.mode)
def test_a_recipe_of_each_distillation_mode_replays_its_accuracy_and_size_exactly(digits_task, tmp_path, mode):
    made = Recipe(task="digits", student=Student("cnn", {"depth": [1, 1], "width": [16, 32]}),
                  prune=Prune(), quantize=Quantize(bits=8, activation_bits=8, qat=mode.mode == "mutual"),
                  distill=mode, finetune=FineTune(epochs=4, lr=1e-2), measure=QUICK_MEASURE)
    first = replays_exactly(made, digits_task, tmp_path)
    assert first.metrics["val_accuracy"] > 0.3, first.metrics  # four epochs from scratch (chance: 0.1)
    assert first.metrics["params"] == student_counts(made, digits_task)["params"]  # no peer or head exported


def replays_exactly(made: Recipe, task: Task, tmp_path):
    """``made`` applied, then the recipe file it wrote loaded and applied as ``autocomp apply`` does: the same
    accuracies, size, parameters and artifact bytes."""
    from autocomp.methods import load_recipe

    first = apply(made, task, tmp_path / "a", progress=False)
    replayed = apply(load_recipe(tmp_path / "a" / "recipe.yaml"), task, tmp_path / "b", progress=False)
    keys = ("val_accuracy", "test_accuracy", "size_bytes", "params")
    assert [first.metrics[k] for k in keys] == [replayed.metrics[k] for k in keys]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert load_recipe(tmp_path / "a" / "recipe.yaml") == check_recipe(made)
    return first


def test_rewinding_resets_the_kept_weights_to_the_teachers_early_checkpoint_after_pruning(digits_task, tmp_path):
    made = Recipe(task="digits", prune=Prune(scope="global", granularity="weight", sparsity=0.8, init="rewind"),
                  finetune=FineTune(epochs=0), measure=QUICK_MEASURE)
    result = apply(made, digits_task, tmp_path / "rewound", progress=False)
    early, state = digits_task.early_teacher(), result.model.state_dict()
    kept = 0
    for name in ("conv2.weight", "conv4.weight", "fc1.weight"):
        weight = state[name]
        mask = weight != 0
        assert torch.equal(weight[mask], early[name][mask])  # kept weights: their early values
        kept += int(mask.sum())
    assert kept < 0.5 * sum(state[n].numel() for n in ("conv2.weight", "conv4.weight", "fc1.weight"))
    trained = apply(dataclasses.replace(made, prune=dataclasses.replace(made.prune, init="trained")), digits_task,
                    tmp_path / "trained", progress=False)
    assert not torch.equal(trained.model.state_dict()["fc1.weight"], state["fc1.weight"])
    replays_exactly(dataclasses.replace(made, finetune=FineTune(epochs=1)), digits_task, tmp_path / "replay")


def test_rewinding_is_refused_in_one_line_where_it_cannot_apply(digits_task, tmp_path):
    with pytest.raises(ConfigError, match=r"init.*'rewind' keeps the network's shape.*granularity 'channel'"):
        Recipe(task="digits", prune=Prune(sparsity=0.5, scope="global", init="rewind"))
    with pytest.raises(ConfigError, match=r"recipe\.prune\.init.*needs the teacher itself as the student.*'cnn'"):
        check_recipe(Recipe(task="digits", student=Student("cnn"),
                            prune=Prune(granularity="weight", sparsity=0.5, scope="global", init="rewind")))
    with pytest.raises(ConfigError, match=r"recipe\.prune\.init.*Task\.early_teacher to return the teacher's own "
                                          r"state dict: cannot rewind conv1\.bias: the early state has no such"):
        apply(Recipe(task="digits", prune=Prune(granularity="weight", sparsity=0.5, scope="global", init="rewind")),
              dataclasses.replace(digits_task, early_teacher=dict), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"recipe\.prune\.init.*Task\.early_teacher.*task 'plateau' gives none"):
        apply(Recipe(task="plateau", prune=Prune(granularity="weight", sparsity=0.5, scope="global", init="rewind")),
              plateau(), tmp_path, progress=False)
