"""Every registered method, through the one `apply` path: the recipe's name reaches the method, and the artifact
loads, runs and reproduces its metrics."""

from __future__ import annotations

import dataclasses
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
from autocomp.registry import Entry
from tests.conftest import QUICK_MEASURE

METHODS = [(family, name) for family, registry in families().items() if family != "task" for name in registry.names()]
METHODS += [("prune.criteria.weight", e.name) for e in families()["prune.criteria"] if e.value.weight_score is not None]


def recipe_using(task, family: str, name: str) -> Recipe:
    from autocomp.compress.prune import prunable_layers

    if family == "student.family":  # the family's default student (the teacher's graph narrowed: its default is the
        # teacher itself, which is not built), distilled, a fifth of its channels pruned
        student = Student(name, config={"width": 0.75} if name == "teacher" else {})
        return Recipe(task=task.name, student=student, prune=Prune(scope="global", sparsity=0.2),
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
    if family == "distill.mode":  # multi-teacher with a second teacher of the digits data
        distill = Distill(mode=name, teachers=["tests.tasks:digits_linear"] if name == "multi_teacher" else [])
    # one epoch recovers half the channels of the trained teacher; half of its weights at random take two
    epochs = 2 if granularity == "weight" else 1
    return Recipe(task=task.name, prune=prune, quantize=quantize, distill=distill, finetune=FineTune(epochs=epochs),
                  measure=QUICK_MEASURE)


def spy(monkeypatch: pytest.MonkeyPatch, family: str, name: str) -> list[str] | None:
    """Replace the registered method ``name`` by one that records each call it gets and does what it did; None for
    the kinds that are no class (``none``, ``logits``: the distillation loss itself)."""
    registry = families()["prune.criteria" if family.startswith("prune.criteria") else family]
    value, calls = registry.get(name), []

    def recorded(function):
        def call(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return call

    if family == "prune.criteria":
        value = dataclasses.replace(value, make=recorded(value.make))
    elif family == "prune.criteria.weight":
        value = dataclasses.replace(value, weight_score=recorded(value.weight_score))
    elif family == "quantize.calibration":
        value = type(value.__name__, (value,), {"range": recorded(value.range)})
    elif family == "distill.kind" and value is not None:
        value = type(value.__name__, (value,), {"forward": recorded(value.forward)})
    elif family == "student.family":
        value = dataclasses.replace(value, build=recorded(value.build))
    elif family == "distill.mode":
        value = dataclasses.replace(value, run=recorded(value.run))
    else:
        return None
    monkeypatch.setitem(registry._entries, name, Entry(name, value, "spied"))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), METHODS)
def test_every_method_is_what_apply_runs_and_yields_a_working_artifact(digits_task, monkeypatch, tmp_path, family,
                                                                      name):
    calls = spy(monkeypatch, family, name)
    result = apply(recipe_using(digits_task, family, name), digits_task, tmp_path, progress=False)
    assert calls is None or calls, f"{family} {name!r} was never called"  # the name reached the method
    assert result.metrics["size_bytes"] == result.artifact.stat().st_size
    logits = runtime.run(runtime.session(result.artifact), digits_task.test.x.numpy())
    assert logits.shape == (len(digits_task.test), 10)
    assert np.isclose(digits_task.metric(logits, digits_task.test.y.numpy()), result.metrics["test_accuracy"])
    # half the channels or weights gone, one or two epochs: far above chance (0.1); a default student from scratch,
    # five epochs: above twice chance
    assert result.metrics["test_accuracy"] > (0.2 if family == "student.family" else 0.5)


def test_methods_command_lists_every_family():
    out = subprocess.run([str(Path(sys.executable).parent / "autocomp"), "methods", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == catalogue()
    assert {"fpgm", "taylor", "bn_scale"} <= {m["name"] for m in catalogue()["prune.criteria"]}
    assert all(m["description"] for family in catalogue().values() for m in family)
