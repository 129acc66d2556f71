"""Where a search's trials run: one registered backend per ``autocomp search --backend`` choice. A backend starts
trials on the opened study until it holds the run's count or the run's deadline passes. Backends import
``autocomp.search.trials`` and ``autocomp.search.worker`` (the loop each of their workers runs), never each other;
Ray is imported only when its backend runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autocomp.registry import Registry
from autocomp.search.local import run_workers
from autocomp.search.trials import Prepared, Run
from autocomp.search.worker import work

if TYPE_CHECKING:
    import optuna

    from autocomp.search.ray_runner import RayOptions


@dataclass(frozen=True)
class Launch:
    """What a backend gets beside the run: the opened study, its space and task, and how the trials should run."""

    study: optuna.Study
    prepared: Prepared
    workers: int = 1  # local processes side by side (the local backend)
    ray: RayOptions | None = None  # the Ray backend's options
    progress: bool = True


BACKENDS: Registry[Callable[[Run, Launch], None]] = Registry("search backend")


@BACKENDS.register("local", "this machine: trials one after another, or in --workers processes on one storage")
def _local(run: Run, launch: Launch) -> None:
    if launch.workers == 1:
        work(run, 0, launch.progress, launch.prepared, launch.study)
    else:
        run_workers(run, launch.workers, launch.progress, launch.study)


@BACKENDS.register("ray", "Ray Tune trials on a Ray cluster (pip install 'autocomp[ray]')")
def _ray(run: Run, launch: Launch) -> None:
    from autocomp.search.ray_runner import run_tune

    run_tune(run, launch.ray, run.reference.read_bytes(), launch.progress)
