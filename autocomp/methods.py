"""Every plug-in family the search can choose from, by the name used in YAML."""

from __future__ import annotations

from autocomp.registry import Registry


def families() -> dict[str, Registry]:
    """Family name (as in YAML) -> its registry."""
    from autocomp.compress.calibrate import CALIBRATORS
    from autocomp.compress.criteria import CRITERIA
    from autocomp.compress.distill import TRANSFERS
    from autocomp.compress.student import STUDENTS
    from autocomp.tasks import TASKS

    return {"prune.criteria": CRITERIA, "quantize.calibration": CALIBRATORS, "distill.kind": TRANSFERS,
            "student.family": STUDENTS, "task": TASKS}


def catalogue() -> dict[str, list[dict[str, str]]]:
    """Every registered method with its one-line description, family by family."""
    return {family: [{"name": e.name, "description": e.description} for e in registry]
            for family, registry in families().items()}
