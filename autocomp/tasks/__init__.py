"""Tasks: a trained teacher, its data splits, an example input and a metric (``Task``), and the registry of
built-in tasks. ``autocomp.tasks.load.load_task`` builds and checks one by name."""

from autocomp.tasks.base import Task, accuracy
from autocomp.tasks.registry import TASKS

__all__ = ["TASKS", "Task", "accuracy"]
