"""Every registered method, through the one `apply` path, on both built-in tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autocomp import runtime
from autocomp.methods import catalogue, families
from autocomp.pipeline import apply
from autocomp.recipe import Distill, FineTune, LayerPrune, Prune, Quantize, Recipe, Student
from tests.conftest import QUICK_MEASURE

METHODS = [(family, name) for family, registry in families().items() if family != "task" for name in registry.names()]
METHODS += [("prune.criteria.weight", e.name) for e in families()["prune.criteria"] if e.value.weight_score is not None]


def recipe_using(task, family: str, name: str) -> Recipe:
    from autocomp.compress.prune import prunable_layers

    if family == "student.family":  # the family's default student, distilled, a fifth of its channels pruned
        return Recipe(task=task.name, student=Student(name), prune=Prune(scope="global", sparsity=0.2),
                      finetune=FineTune(epochs=5, lr=3e-3), measure=QUICK_MEASURE)
    layers = prunable_layers(task.teacher, task.example_input)
    criterion = name if family.startswith("prune.criteria") else "l1"
    granularity = "weight" if family == "prune.criteria.weight" else "channel"
    named = layers if granularity == "weight" else {layer.group for layer in layers.values()}  # a group once
    prune = Prune(granularity=granularity, regrow=0.1 if granularity == "weight" else 0.0,
                  layers={n: LayerPrune(0.5, criterion if criterion in layers[n].criteria(granularity) else "l1")
                          for n in named})
    quantize = Quantize(bits=8, activation_bits=8, calibration=name) if family == "quantize.calibration" else Quantize()
    distill = Distill(kind=name, weight=5.0) if family == "distill.kind" else Distill()
    return Recipe(task=task.name, prune=prune, quantize=quantize, distill=distill, finetune=FineTune(epochs=2),
                  measure=QUICK_MEASURE)


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["digits", "mnist1d"])
@pytest.mark.parametrize(("family", "name"), METHODS)
def test_method_yields_an_artifact_that_loads_runs_and_matches_its_size(request, tmp_path, task_name, family, name):
    task = request.getfixturevalue(f"{task_name}_task")
    result = apply(recipe_using(task, family, name), task, tmp_path, progress=False)
    assert result.metrics["size_bytes"] == result.artifact.stat().st_size
    logits = runtime.run(runtime.session(result.artifact), task.test.x.numpy())
    assert logits.shape == (len(task.test), 10)
    assert np.isclose(task.metric(logits, task.test.y.numpy()), result.metrics["test_accuracy"])
    # half the channels gone, two epochs: still far above chance (0.1); a default student from scratch, five
    # epochs: above twice chance (an MLP on MNIST-1D reaches 0.30 here)
    assert result.metrics["test_accuracy"] > (0.2 if family == "student.family" else 0.5)


def test_methods_command_lists_every_family():
    out = subprocess.run([str(Path(sys.executable).parent / "autocomp"), "methods", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == catalogue()
    assert {"fpgm", "taylor", "bn_scale"} <= {m["name"] for m in catalogue()["prune.criteria"]}
    assert all(m["description"] for family in catalogue().values() for m in family)
