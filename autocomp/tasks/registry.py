"""The task registry, and the import of a ``"package.module:function"`` task's plug-ins (``load_task`` in
``autocomp.tasks.load`` builds and checks a task)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from autocomp.registry import Registry

TASKS: Registry[Callable[..., object]] = Registry("task")


def import_plugins(ref: str) -> None:
    """Import the module of a ``"package.module:function"`` task, so the plug-ins it registers (a student family,
    a criterion) are known before a recipe or space naming them is read; a module that does not import is left
    for ``load_task`` to report."""
    if ":" in ref:
        try:
            importlib.import_module(ref.partition(":")[0])
        except ImportError:
            pass
