"""autocomp: AutoML model-compression search for PyTorch.

The public API is imported lazily so that ``import autocomp`` (and ``autocomp --help``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from autocomp import kernels

kernels.pin()  # before torch loads: every entry point (CLI, spawned workers, Ray workers) imports autocomp first

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "autocomp.recipe",
    "SearchSpace": "autocomp.space",
    "StudySpec": "autocomp.study",
    "Task": "autocomp.tasks",
    "load_task": "autocomp.tasks.load",
    "apply": "autocomp.pipeline",
    "load": "autocomp.deployed",
    "run_search": "autocomp.search.optuna_runner",
    "AutocompError": "autocomp.errors",
    "ConfigError": "autocomp.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autocomp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
