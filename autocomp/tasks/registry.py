"""The task registry and the resolver for built-in names and ``"package.module:function"``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from autocomp.errors import ConfigError
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


def load_task(ref: str):
    """Build the Task named ``ref``: a built-in name, or ``"package.module:function"``."""
    from autocomp.tasks.base import Task
    from autocomp.tasks.check import check_task

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
