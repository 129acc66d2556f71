"""A search space narrowed to what a task's model can use, in place, one line per narrowing: pruning ranges capped at
what the model holds (residual blocks, attention heads), and choices it cannot use taken out (a distillation kind
or mode, a student family)."""

from __future__ import annotations

import dataclasses
from typing import Any

from autocomp.compress.distill import hidden_layers
from autocomp.compress.facts import teacher_facts
from autocomp.compress.student import STUDENTS, can_build
from autocomp.dimensions import Param
from autocomp.errors import ConfigError
from autocomp.space import SearchSpace
from autocomp.tasks import Task


def narrow(space: SearchSpace, key: str, most: float, why: str, task: str) -> str | None:
    """Keep the values of ``prune.<key>`` up to ``most``, what the model can hold (``why``: "has ..."); say
    what was narrowed. A space whose every value exceeds it is refused."""
    param = space.pruning.get(key)
    if param is None or max(param.candidates()) <= most:
        return None
    kept = [c for c in param.candidates() if c <= most] if param.choices is not None else (
        [] if param.low > most else [param.low, most])
    if not kept:
        raise ConfigError(f"must allow at most {most} for the {task!r} model, which {why}, but allows only "
                          f"{param.candidates()}.", f"space.prune.{key}")
    narrowed = Param(choices=tuple(kept)) if param.choices is not None else dataclasses.replace(param, high=most)
    space.pruning[key] = narrowed
    return f"space.prune.{key} narrowed from {param.candidates()} to {narrowed.candidates()}: the {task!r} model {why}"


def narrow_choices(space: SearchSpace, section: str, key: str, unusable: Any, why: str, task: str) -> str | None:
    """Take the choice ``unusable`` out of ``<section>.<key>`` where the model cannot use it (``why``: "has
    ..."); say what was narrowed. A space whose only choice it is, is refused."""
    param = space.sections[section].get(key)
    if param is None or param.choices is None or unusable not in param.choices:
        return None
    kept = tuple(c for c in param.choices if c != unusable)
    if not kept:
        raise ConfigError(f"cannot be {unusable!r} for the {task!r} model, which {why}.", f"space.{section}.{key}")
    space.sections[section][key] = Param(choices=kept)
    if (section, key) == ("student", "family"):
        space.students.pop(unusable, None)  # its knobs are not sampled either
    return f"space.{section}.{key} narrowed from {list(param.choices)} to {list(kept)}: the {task!r} model {why}"


def names_teachers(space: SearchSpace) -> bool:
    """Whether this space names extra teachers (``distill.teachers``) in every choice."""
    param = space.sections.get("distill", {}).get("teachers")
    return param is not None and all(param.candidates())


def narrow_to_model(space: SearchSpace, task: Task, name: str) -> list[str]:
    """Narrow ``space`` to what the task's model can use, in place; one line per narrowing."""
    facts = teacher_facts(task)
    blocks, attention = facts.blocks, facts.attention
    no_attention = "has no attention module (nn.MultiheadAttention)"
    shape = tuple(task.example_input.shape[1:])
    no_teachers = "gives no extra teachers (Task.teachers), nor does the space (distill.teachers)"
    return list(filter(None, [
        narrow(space, "drop_blocks", len(blocks), f"has {len(blocks)} residual block(s)", name),
        narrow(space, "heads", 1.0 if attention else 0.0, no_attention, name),
        narrow_choices(space, "distill", "kind", "attention_matrix", no_attention, name) if not attention else None,
        narrow_choices(space, "distill", "kind", "hidden", "has no transformer layer or residual block", name)
        if not hidden_layers(task.teacher, task.example_input) else None,
        narrow_choices(space, "distill", "mode", "multi_teacher", no_teachers, name)
        if not (task.teachers or names_teachers(space)) else None,
        *(narrow_choices(space, "student", "family", family, f"has input {shape}, which {family!r} cannot take", name)
          for family in space.families() if not can_build(family, task)),
        *(narrow_choices(space, "student", "family", family, f"names {list(task.students)} as the student families "
                         "that fit its data (Task.students)", name) for family in unfitting(space, task))]))


def unfitting(space: SearchSpace, task: Task) -> list[str]:
    """The new-network families ``space`` offers that ``task`` does not name as fitting its data; none where the
    task names none, or where the space offers none that it names (what the space writes is then kept)."""
    offered = [f for f in space.families() if not STUDENTS.get(f).derived]
    if not task.students or not set(offered) & set(task.students):
        return []
    return [f for f in offered if f not in task.students]
