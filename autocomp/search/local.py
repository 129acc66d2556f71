"""The search's backends on this machine: one worker in this process, or worker processes side by side on one
storage (a journal file or a database). Each worker starts trials until the study holds its count or the run's
deadline passes."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from autocomp import phase
from autocomp.search.trials import (
    SEED_STRIDE,
    Prepared,
    Run,
    budget_left,
    counted,
    finished_trials,
    front_status,
    make_objective,
    make_sampler,
    open_study,
)
from autocomp.storage import fail_dead_trials
from autocomp.trial_rows import lagging

if TYPE_CHECKING:
    import optuna

    from autocomp.search.objective import Objective

DEAD_CHECK_SECONDS = 5.0  # how often a worker looks for dead workers' trials (each look reads every running trial)


def work(run: Run, index: int, progress: bool, prepared: Prepared | None = None,
         study: optuna.Study | None = None) -> None:
    """One worker: start trials until the study holds ``run.trials`` counted ones or the deadline passes.

    Every few seconds, between trials, the worker fails the trials of dead workers (queued again,
    ``autocomp.storage``); while the trials still running elsewhere would complete the count, it waits for them
    instead of starting more. Its view of the other workers' trials may lag a second (``autocomp.trial_rows``).
    """
    import optuna
    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = study or open_study(run.spec, create=False)
    done = finished_trials(study)
    objective = make_objective(run, study, prepared)
    study.sampler = make_sampler(run.spec, run.seed + done + SEED_STRIDE * index, objective)  # no two draws alike
    bar = tqdm(total=run.trials, initial=done, desc="trials", disable=not progress, unit="trial")
    status = Status(bar, study, run.deadline) if progress else None
    with phase.listening(status.phase if status else lambda now: None), lagging(study):
        checked = 0.0
        while run.deadline is None or time.time() < run.deadline:
            if time.monotonic() - checked >= DEAD_CHECK_SECONDS:
                fail_dead_trials(study)
                checked = time.monotonic()
            trials = study.get_trials(deepcopy=False)
            done, running = len(counted(trials)), sum(t.state.name == "RUNNING" for t in trials)
            bar.update(done - bar.n)
            if status:
                status.count(done)
            if done >= run.trials:
                break
            if done + running >= run.trials:  # the others' trials would complete the count: wait for them
                time.sleep(1.0)
                continue
            run_one(study, objective)
    bar.close()


def run_one(study: optuna.Study, objective: Objective) -> None:
    """One trial, as ``study.optimize`` runs it (stale trials failed first, heartbeats while it runs). A trial that
    another worker failed meanwhile (its heartbeat went stale while this process was starved of CPU, or it was
    judged dead) stays failed, and this worker goes on."""
    from autocomp.patient import StorageUnavailable, causes

    try:
        study.optimize(objective, n_trials=1, catch=(Exception,))
    except Exception as err:
        unavailable = next((e for e in causes(err) if isinstance(e, StorageUnavailable)), None)
        if unavailable is not None:  # the storage, not the trial: said in one line (Optuna's tell may hide it)
            raise unavailable from None
        if not (isinstance(err, ValueError) and "Cannot tell a" in str(err)):  # a trial no longer RUNNING
            raise
        print(f"autocomp: a trial of this worker was failed by another meanwhile ({err}); going on", file=sys.stderr)


def run_workers(run: Run, workers: int, progress: bool, study: optuna.Study) -> None:
    """Run ``workers`` processes of ``work`` and follow the study's count until they end."""
    import multiprocessing

    from tqdm import tqdm

    # forked from a server that imported the search (and torch) once: the workers share those pages, and none forks
    # torch's threads or a storage's connections (the server has neither)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    processes = [context.Process(target=_worker, args=(run, index), name=f"autocomp-worker-{index}")
                 for index in range(workers)]
    for process in processes:
        process.start()
    with tqdm(total=run.trials, initial=finished_trials(study), desc=f"trials ({workers} workers)",
              disable=not progress, unit="trial") as bar:
        status = Status(bar, study, run.deadline) if progress else None
        while any(p.is_alive() for p in processes):
            for process in processes:
                process.join(timeout=2.0 / workers)
            done = finished_trials(study)
            bar.update(done - bar.n)
            if status:
                status.count(done)
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


class Status:
    """The progress bar's text: the study's front and hypervolume (read again only when the count of finished
    trials changed), the budget left, and the phase of the trial running in this process."""

    def __init__(self, bar, study: optuna.Study, deadline: float | None) -> None:
        self.bar, self.study, self.deadline = bar, study, deadline
        self.done: int | None = None
        self.front = self.now = ""

    def count(self, done: int) -> None:
        """Between trials: the front as it stands now (no trial runs here)."""
        if done != self.done:
            self.front, self.done = front_status(self.study), done
        self.now = ""
        self.show()

    def phase(self, now: str) -> None:
        self.now = now
        self.show()

    def show(self) -> None:
        study = ", ".join(filter(None, [self.front, budget_left(self.deadline)]))
        self.bar.set_postfix_str(" | ".join(filter(None, [study, self.now])))

