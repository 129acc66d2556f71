"""Every plug-in family the search can choose from, by the name used in YAML, and the check of the methods a
recipe names against them: a recipe is data (``autocomp.recipe``), checked here where it is loaded or applied."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from autocomp.compress.calibrate import CALIBRATORS
from autocomp.compress.criteria import CRITERIA, applicable
from autocomp.compress.distill import TRANSFERS
from autocomp.compress.modes import MODES, combines
from autocomp.compress.student import STUDENTS, is_teacher, resolved
from autocomp.config import in_file, read_yaml, to_dict
from autocomp.errors import ConfigError
from autocomp.recipe import Distill, Recipe
from autocomp.registry import Registry
from autocomp.tasks.load import TASKS
from autocomp.tasks.registry import import_plugins

# a recipe's field that names a plug-in: (section, field) -> its family (``families``)
NAMED = {("prune", "criterion"): "prune.criteria", ("quantize", "calibration"): "quantize.calibration",
         ("distill", "mode"): "distill.mode", ("distill", "kind"): "distill.kind",
         ("student", "family"): "student.family"}


# a distillation mode's own fields -> the mode that reads them
MODE_FIELDS = {"teachers": "multi_teacher", "generations": "born_again", "peers": "mutual", "assistant": "assistant",
               "assistant_epochs": "assistant"}


def families() -> dict[str, Registry]:
    """Family name (as in YAML) -> its registry."""
    return {"prune.criteria": CRITERIA, "quantize.calibration": CALIBRATORS, "distill.mode": MODES,
            "distill.kind": TRANSFERS, "student.family": STUDENTS, "task": TASKS}


def catalogue() -> dict[str, list[dict[str, str]]]:
    """Every registered method with its one-line description, family by family."""
    return {family: [{"name": e.name, "description": e.description} for e in registry]
            for family, registry in families().items()}


def check_name(section: str, key: str, value: Any, path: str) -> None:
    """A ConfigError naming ``path.key`` unless ``value`` of a section's field that names a plug-in is registered
    (any other field passes)."""
    family = NAMED.get((section, key))
    if family is not None:
        families()[family].get(value, field=f"{path}.{key}")


def check_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` with every method it names registered (else one ConfigError naming the field) and its student
    as its family reads it (``autocomp.compress.student.resolved``)."""
    for section, key in NAMED:
        check_name(section, key, getattr(getattr(recipe, section), key), f"recipe.{section}")
    p = recipe.prune
    for name, layer in p.layers.items():
        check_name("prune", "criterion", layer.criterion, f"recipe.prune.layers.{name}")
    if p.granularity == "weight" and CRITERIA.get(p.criterion).weight_score is None:
        raise ConfigError(f"must score single weights {applicable('weight')} when granularity is 'weight', but "
                          f"got {p.criterion!r}.", "recipe.prune.criterion")
    if p.scope == "local" and p.sparsity > 0:  # it would prune nothing: each entry of layers has its own
        raise ConfigError(f"must be 0 in scope 'local', where each entry of layers gives its own sparsity (set "
                          f"scope: global for one level over all channels or weights), but got {p.sparsity}.",
                          "recipe.prune.sparsity")
    if p.init == "rewind" and not is_teacher(recipe.student):
        raise ConfigError(f"'rewind' resets weights to the teacher's early checkpoint, so needs the teacher itself "
                          f"as the student, but got {recipe.student.family!r} {recipe.student.config}.",
                          "recipe.prune.init")
    d = recipe.distill
    if not combines(d.mode, d.kind):
        raise ConfigError(f"must be one of the kinds the distillation mode {d.mode!r} combines with "
                          f"{MODES.get(d.mode).kinds}, but got {d.kind!r}.", "recipe.distill.kind")
    default = Distill()
    for key, mode in MODE_FIELDS.items():  # one recipe, one key: a field its mode does not read stays at its default
        value = getattr(d, key)
        if d.mode != mode and value != getattr(default, key):
            raise ConfigError(f"is read by the distillation mode {mode!r} only, but the mode is {d.mode!r}: leave it "
                              f"out (got {to_dict(value) if dataclasses.is_dataclass(value) else value!r}).",
                              f"recipe.distill.{key}")
    try:
        student = resolved(recipe.student)
    except ConfigError as err:
        raise err.located("recipe.student") from None
    try:
        helper = resolved(d.assistant) if d.assistant is not None else None
    except ConfigError as err:
        raise err.located("recipe.distill.assistant") from None
    return dataclasses.replace(recipe, student=student, distill=dataclasses.replace(d, assistant=helper))


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """A recipe from its YAML form, checked: a ``"package.module:function"`` task's module is imported first, so
    the plug-ins it registers are known."""
    if isinstance(data, dict) and isinstance(data.get("task"), str):
        import_plugins(data["task"])
    return check_recipe(Recipe.from_dict(data))


def load_recipe(path: str | Path) -> Recipe:
    """The recipe file at ``path``, checked (``recipe_from_dict``)."""
    with in_file(path):
        return recipe_from_dict(read_yaml(path, "recipe"))
