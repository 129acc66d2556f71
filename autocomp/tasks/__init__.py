"""Tasks: a trained teacher, its data splits, an example input and a metric."""

from autocomp.tasks import digits, mnist1d  # noqa: F401  (register the built-in tasks)
from autocomp.tasks.base import Task, accuracy
from autocomp.tasks.registry import TASKS, load_task

__all__ = ["TASKS", "Task", "accuracy", "load_task"]
