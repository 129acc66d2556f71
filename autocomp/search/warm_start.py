"""Warm start: the policies a new study runs first, before its sampler draws anything.

A hand-made pipeline prunes every group of the teacher to one level by L1, distils logits (alpha 0.7, T 4), fine-tunes
for the longest the space allows and deploys fp32 or static int8 (min-max, per channel). A study's
first trials are those recipes, at each of the space's ``warm_start.levels``, so its front starts where
such a pipeline ends. With ``warm_start.sensitivity`` it also runs the same levels allocated by the
teacher's sensitivity map. Groups are ranked by the accuracy their pruning alone costs at the level per
parameter it holds (a large group that costs little is the best place to remove parameters; a small fragile
one saves little and costs much): the first third gets the space's next share above 1, the last third the
next share below 1, the rest the level itself. Static int8 keeps fp32 the layers whose int8 alone costs
more than ``INT8_TOLERANCE`` of validation accuracy. A space with a ``policy`` (``autocomp.allocation``) gets the
same two kinds through its knobs: ``follow`` 0 and nothing protected (uniform), or ``follow`` ``FOLLOW`` and
``protect`` at ``INT8_TOLERANCE`` (allocated by sensitivity). A space whose student families include new networks
can name some (``warm_start.students``): each runs in each format, distilled from scratch, so the sampler sees
from the start what a small network of its own shape reaches. A named student with at least the teacher's
parameters compresses nothing and is left out (a small teacher's warm start is its levels).

A policy names only values the space can take; any dimension it cannot set is sampled as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from autocomp.compress.student import STUDENTS, build_student, can_build
from autocomp.dimensions import Param, layer_dimension, per_layer
from autocomp.recipe import QAT_BELOW, Student
from autocomp.sensitivity import Sensitivity
from autocomp.space import FORMATS
from autocomp.tasks import Task

UNIFORM: dict[str, Any] = {
    "prune.scope": "local", "prune.granularity": "channel", "prune.criterion": "l1", "prune.rounds": 1,
    "prune.regrow": 0.0, "prune.bn_penalty": 0.0, "prune.drop_blocks": 0, "prune.heads": 0.0,
    "quantize.symmetric": True, "quantize.per_channel": True, "quantize.calibration": "minmax", "quantize.qat": False,
    "quantize.kmeans": False,
    "distill.kind": "logits", "distill.alpha": 0.7, "distill.temperature": 4.0, "finetune.lr": 1e-3,
    "student.family": "teacher", "student.init": "teacher", "student.teacher.depth": 1.0, "student.teacher.width": 1.0,
    "policy.follow": 0.0,
}
INT8_TOLERANCE = 0.01
FOLLOW = 1.0  # how strongly a policy's allocation follows the sensitivity map (``autocomp.allocation``)


def _nearest(param: Param, value: float) -> float:
    """``value``, or the nearest value ``param`` can take."""
    if param.choices is not None:
        return min(param.choices, key=lambda c: abs(c - value))
    return min(max(value, param.low), param.high)


def uniform_policy(dims: dict[str, Param], level: float, fmt: str) -> dict[str, Any]:
    """The values of one hand-made recipe: every group at ``level``, deployed as ``fmt`` (``FORMATS``)."""
    bits, activation_bits = FORMATS[fmt]
    wanted = dict(UNIFORM, **{"prune.sparsity": level, "quantize.activation_bits": activation_bits,
                              "quantize.bits": bits, "quantize.qat": bits < QAT_BELOW})
    for name, param in dims.items():
        _, rule = per_layer(name) or ("", "")
        if rule == "share":
            wanted[name] = 1.0
        elif rule:  # a layer's own weight or activation bits
            wanted.setdefault(name, bits if rule == "bits" else activation_bits)
        elif name in ("finetune.epochs", "policy.protect"):  # the longest fine-tune; no layer protected
            wanted[name] = max(param.candidates())
    return _settable(dims, wanted)


def _settable(dims: dict[str, Param], wanted: dict[str, Any]) -> dict[str, Any]:
    """The values of ``wanted`` a policy can set: free dimensions of ``dims`` that admit them."""
    return {name: value for name, value in wanted.items()
            if name in dims and not dims[name].fixed and dims[name].admits(value)}


def sensitivity_policy(dims: dict[str, Param], level: float, fmt: str, sensitivity: Sensitivity,
                       groups: dict[str, str], sizes: dict[str, int]) -> dict[str, Any]:
    """``uniform_policy`` with the level allocated by ``sensitivity``; ``groups`` maps each layer to its group,
    ``sizes`` each group to its parameter count."""
    policy = uniform_policy(dims, level, fmt)
    knobs = {"policy.follow": FOLLOW, "policy.protect": 100 * INT8_TOLERANCE}  # a space with a policy: its knobs
    policy |= {name: _nearest(dims[name], value) for name, value in knobs.items() if name in dims}
    layers = {name: found[0] for name in dims if (found := per_layer(name)) and found[1] == "share"}
    shares = sorted({p for name in layers for p in dims[name].candidates()})
    if shares:
        ranked = sorted(sensitivity.prune, key=lambda g: (sensitivity.prune_drop(g, level) / max(sizes.get(g, 1), 1),
                                                          -sizes.get(g, 0)))  # the cheapest parameters first
        third = len(ranked) / 3
        middle = min(shares, key=lambda s: abs(s - 1.0))
        above, below = [s for s in shares if s > middle], [s for s in shares if s < middle]
        share = {g: (above[0] if above else middle) if i < third else (below[-1] if below else middle)
                 if i >= len(ranked) - third else middle for i, g in enumerate(ranked)}
        policy |= {name: share[groups[layer]] for name, layer in layers.items()}
    if fmt == "int8":
        for layer in sensitivity.quantize:
            name = layer_dimension("quantize", layer, "activation_bits")
            if name in dims and dims[name].admits(32) and sensitivity.quantize_drop(layer, 8) > INT8_TOLERANCE:
                policy[name] = 32
    return policy


def student_policy(dims: dict[str, Param], student: Student, fmt: str) -> dict[str, Any]:
    """``uniform_policy`` with ``student``, a new network distilled from scratch, in place of the pruned teacher."""
    family = STUDENTS.get(student.family)
    knobs = {f"student.{student.family}.{knob}": value for knob, value in family.encode(student.config).items()}
    policy = uniform_policy(dims, 0.0, fmt)
    wanted = {"student.family": student.family, "student.init": student.init, **knobs}
    return policy | _settable(dims, wanted)


def smaller_students(students: Sequence[Student], task: Task) -> list[Student]:
    """The ``students`` that take ``task``'s input with fewer parameters than its teacher."""
    def params(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    teacher = params(task.teacher)  # counted once, not per student
    return [student for student in students
            if can_build(student.family, task) and params(build_student(student, task)) < teacher]


def group_sizes(model: nn.Module, groups: dict[str, str]) -> dict[str, int]:
    """Each group's parameter count: the parameters of its member layers (``groups`` maps a layer to its group)."""
    sizes = dict.fromkeys(groups.values(), 0)
    for layer, group in groups.items():
        sizes[group] += sum(p.numel() for p in model.get_submodule(layer).parameters())
    return sizes


def warm_start(dims: dict[str, Param], levels: list[float], sensitivity: Sensitivity | None = None,
               groups: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
               formats: Sequence[str] = ("fp32", "int8"), students: Sequence[Student] = ()) -> list[dict[str, Any]]:
    """The distinct policies of a warm start: uniform at each level in each format, then allocated by sensitivity,
    then each student the space can draw (``dims["student.family"]`` offers its family) in each format."""
    policies = [uniform_policy(dims, level, fmt) for level in levels for fmt in formats]
    if sensitivity is not None and groups is not None:
        policies += [sensitivity_policy(dims, level, fmt, sensitivity, groups, sizes or {}) for level in levels
                     for fmt in formats]
    family = dims.get("student.family")
    policies += [student_policy(dims, student, fmt) for student in students
                 if family is not None and family.admits(student.family) for fmt in formats]
    distinct: list[dict[str, Any]] = []
    for policy in policies:
        if policy not in distinct:
            distinct.append(policy)
    return distinct
