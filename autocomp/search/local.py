"""The local backend's worker processes: ``--workers N`` side by side on one storage (a journal file or a
database), each a worker of the study (``autocomp.search.worker``) started from a fork server."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from autocomp.search.trials import Run
from autocomp.search.worker import following, work

if TYPE_CHECKING:
    import optuna


def run_workers(run: Run, workers: int, progress: bool, study: optuna.Study) -> None:
    """Run ``workers`` processes of ``work`` and follow the study's count until they end."""
    import multiprocessing

    # forked from a server that imported the search (and torch) once: the workers share those pages, and none forks
    # torch's threads or a storage's connections (the server has neither)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    processes = [context.Process(target=_worker, args=(run, index), name=f"autocomp-worker-{index}")
                 for index in range(workers)]
    for process in processes:
        process.start()
    with following(study, run, f"trials ({workers} workers)", progress):
        for process in processes:
            process.join()
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        print(f"autocomp: {len(failed)} worker(s) stopped early (exit codes {[p.exitcode for p in failed]}); "
              "their running trials are failed and retried by the next search")


def _worker(run: Run, index: int) -> None:
    """A worker process: ``work``, ending in one line and exit code 2 on an error of the user's or the storage's
    (``autocomp.patient``), not in a traceback."""
    from autocomp.errors import AutocompError

    try:
        work(run, index, False)
    except AutocompError as err:
        print(f"autocomp: error: worker {index}: {err}", file=sys.stderr)
        sys.exit(2)
