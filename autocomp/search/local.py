"""The search's backends on this machine: one worker in this process, or worker processes side by side on one
storage (a journal file or a database). Each worker starts trials until the study holds its count or the run's
deadline passes."""

from __future__ import annotations

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

if TYPE_CHECKING:
    import optuna


def work(run: Run, index: int, progress: bool, prepared: Prepared | None = None,
         study: optuna.Study | None = None) -> None:
    """One worker: start trials until the study holds ``run.trials`` counted ones or the deadline passes.

    Before each trial the worker fails the trials of dead workers (queued again, ``autocomp.storage``); while
    the trials still running elsewhere would complete the count, it waits for them instead of starting more.
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
    with phase.listening(status.phase if status else lambda now: None):
        while run.deadline is None or time.time() < run.deadline:
            fail_dead_trials(study)
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
            study.optimize(objective, n_trials=1, catch=(Exception,))
    bar.close()


def run_workers(run: Run, workers: int, progress: bool, study: optuna.Study) -> None:
    """Run ``workers`` processes of ``work`` and follow the study's count until they end."""
    import multiprocessing

    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or storage state
    processes = [context.Process(target=work, args=(run, index, False), name=f"autocomp-worker-{index}")
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

