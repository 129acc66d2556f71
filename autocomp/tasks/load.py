"""Loading a task (``load_task``), and what autocomp needs of its teacher, checked once when the task loads: a
classifier that returns one (batch, classes) tensor of logits for its example input, and that exports to ONNX (the
artifact autocomp deploys). A teacher that breaks a rule is refused with one line naming the model, its type and the
rule."""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

import torch

from autocomp import runtime
from autocomp.compress.student import family
from autocomp.errors import ConfigError
from autocomp.tasks import digits, mnist1d  # noqa: F401  (register the built-in tasks)
from autocomp.tasks.base import Task
from autocomp.tasks.registry import TASKS


def load_task(ref: str):
    """Build the Task named ``ref``: a built-in name, or ``"package.module:function"``."""
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"`task` entry point {ref!r} cannot be loaded: {err}.") from err
    else:
        factory = TASKS.get(ref, field="task")
    task = factory()
    if not isinstance(task, Task):
        raise ConfigError(f"`task` {ref!r} must return an autocomp Task, but returned {type(task).__name__}.")
    check_task(task, ref)
    return task


def check_task(task: Task, ref: str) -> None:
    """Raise ``ConfigError`` if ``task``'s teacher is not one autocomp can compress (module docstring), or if it
    names a student family that is not registered."""
    for name in task.students:
        family(name, "Task.students")

    what = f"task {ref!r}: the teacher ({type(task.teacher).__name__})"
    x = task.example_input
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"task {ref!r}: `example_input` must be one tensor of one sample, shaped (1, ...), but "
                          f"got {got}.")
    try:
        with torch.no_grad():
            out = task.teacher.eval()(x)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported as one line
        raise ConfigError(f"{what} fails on its example input {tuple(x.shape)}: {type(err).__name__}: "
                          f"{_first_line(err)}") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        got = f"a tensor {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} returns {got}; autocomp compresses classifiers that return one "
                          f"(batch, classes) tensor of logits.")
    check_data(task, ref, classes=out.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            runtime.export_onnx(task.teacher, x, Path(tmp) / "teacher.onnx")
        except Exception as err:  # noqa: BLE001 - both exporters failed; their reason is the user's to read
            raise ConfigError(f"{what} cannot be exported to ONNX, the artifact autocomp deploys: "
                              f"{type(err).__name__}: {_first_line(err)}") from err


def check_data(task: Task, ref: str, classes: int) -> None:
    """Raise ``ConfigError``, naming the split and what is wrong, unless every split is non-empty, shaped as the
    example input, finite, and labelled within the teacher's ``classes``."""
    sample = tuple(task.example_input.shape[1:])
    for name in ("train", "val", "test"):
        split = getattr(task, name)
        where = f"task {ref!r}: the {name} split"
        if not isinstance(split.x, torch.Tensor) or not isinstance(split.y, torch.Tensor):
            raise ConfigError(f"{where} must hold tensors x and y, but holds {type(split.x).__name__} and "
                              f"{type(split.y).__name__}.")
        if len(split.y) == 0 or len(split.x) == 0:
            raise ConfigError(f"{where} is empty.")
        if len(split.x) != len(split.y):
            raise ConfigError(f"{where} has {len(split.x)} inputs but {len(split.y)} labels.")
        if tuple(split.x.shape[1:]) != sample:
            raise ConfigError(f"{where} has samples shaped {tuple(split.x.shape[1:])}, but the example input's "
                              f"sample is {sample}.")
        if split.x.is_floating_point():
            bad = (~torch.isfinite(split.x)).flatten(1).any(dim=1).nonzero().flatten()
            if len(bad):
                raise ConfigError(f"{where} holds non-finite inputs (NaN or inf) in {len(bad)} of {len(split.x)} "
                                  f"samples (the first: sample {int(bad[0])}); clean or drop them.")
        if split.y.is_floating_point() or split.y.dim() != 1:
            raise ConfigError(f"{where} must have integer class labels shaped (N,), but has {split.y.dtype} "
                              f"labels shaped {tuple(split.y.shape)}.")
        outside = ((split.y < 0) | (split.y >= classes)).nonzero().flatten()
        if len(outside):
            values = sorted({int(v) for v in split.y[outside]})[:5]
            raise ConfigError(f"{where} has {len(outside)} label(s) outside the teacher's {classes} classes "
                              f"[0, {classes - 1}]: {values}.")


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""
