"""StudySpec: a study YAML (task, space, objectives, budget, storage, measurement), validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from autocomp.config import check_schema_version, from_dict, in_file, read_yaml
from autocomp.errors import ConfigError, check_choice, check_range
from autocomp.fidelity import Screening
from autocomp.recipe import Measure
from autocomp.storage import resolve as resolve_storage

SCHEMA_VERSION = 1
# what a search may optimise; test_accuracy is reported only (selecting on it is the winner's curse)
METRICS = ("val_accuracy", "size_bytes", "latency_ms", "macs", "params", "nonzero_params")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("nsga2", "tpe", "gp", "random", "proxy")
CAPS = ("params", "macs", "size_bytes")  # what a study may cap (params and MACs are checked before training)


def _default_objectives() -> dict[str, str]:
    return {"val_accuracy": "maximize", "size_bytes": "minimize", "latency_ms": "minimize"}


@dataclass
class StudySpec:
    """One search: what to compress (task), how (space), towards what (objectives), where stored.

    Relative paths (``space``, ``artifacts`` and SQLite or journal files in ``storage``) are resolved
    against the study file's folder, so a study runs the same from any working directory.
    """

    study_name: str
    task: str
    space: str
    trials: int = 20
    timeout: float | None = None  # seconds: also stop starting trials after this long (a wall-clock budget)
    trial_timeout: float | None = None  # seconds one trial may run (screen and full run); past it, FAIL
    seed: int = 0
    sampler: str = "nsga2"
    population_size: int = 8
    objectives: dict[str, str] = field(default_factory=_default_objectives)
    storage: str | None = None  # default: sqlite:///<study folder>/<study_name>.db
    artifacts: str | None = None  # default: <study folder>/<study_name>_artifacts
    measure: Measure = field(default_factory=Measure)
    screening: Screening | None = None  # multi-fidelity (``autocomp.fidelity``); None: every trial full
    constraints: dict[str, float] = field(default_factory=dict)  # metric -> the most a feasible trial may have
    source: str | None = field(default=None, init=False, compare=False)  # the YAML file it was loaded from

    def __post_init__(self) -> None:
        check_range("trials", self.trials, 1, 10**6)
        if self.timeout is not None:
            check_range("timeout", self.timeout, 1, 10**7)
        if self.trial_timeout is not None:
            check_range("trial_timeout", self.trial_timeout, 0.001, 10**7)
        check_range("population_size", self.population_size, 2, 10**5)
        check_choice("sampler", self.sampler, SAMPLERS)
        if not self.objectives:
            raise ConfigError("must name at least one metric to optimise, but got {}.", "objectives")
        for metric, direction in self.objectives.items():
            if metric in ("accuracy", "test_accuracy"):
                raise ConfigError(f"must rank trials on the validation split ('val_accuracy'; the test split is only "
                                  f"reported), but got {metric!r}.", "objectives")
            check_choice("objectives", metric, METRICS)
            check_choice(f"objectives.{metric}", direction, DIRECTIONS)
        for metric, cap in self.constraints.items():
            check_choice("constraints", metric, CAPS)
            check_range(f"constraints.{metric}", cap, 1, 1e15)

    @classmethod
    def load(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        with in_file(path):
            data = read_yaml(path, "study")
            check_schema_version(data, SCHEMA_VERSION, "study")
            spec = from_dict(cls, {k: v for k, v in data.items() if k != "schema_version"}, "study")
            spec.source = str(path)
            return spec.resolved(path.parent)

    def resolved(self, folder: Path) -> StudySpec:
        """Make the relative paths absolute against ``folder`` and fill in the defaults."""
        folder = folder.resolve()
        self.space = os.path.normpath(folder / self.space)
        self.artifacts = os.path.normpath(folder / (self.artifacts or f"{self.study_name}_artifacts"))
        self.storage = resolve_storage(self.storage or f"sqlite:///{self.study_name}.db", folder)
        return self
