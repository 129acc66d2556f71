"""A worker of a study, whatever starts it (this process, a worker process, a Ray actor): it starts trials until
the study holds the run's count or the run's deadline passes, and a progress bar follows the study's count."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
Wrap = Callable[["Objective"], Callable[["optuna.Trial"], list[float]]]  # what a backend adds around each trial


def work(run: Run, index: int, progress: bool, prepared: Prepared | None = None,
         study: optuna.Study | None = None, wrap: Wrap | None = None) -> None:
    """One worker: start trials until the study holds ``run.trials`` counted ones or the deadline passes; each
    trial runs the objective (``wrap``-ped, where a backend adds to it).

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
    study.sampler = make_sampler(run.spec, run.seed + done + SEED_STRIDE * index, objective)  # no two draw alike
    each = wrap(objective) if wrap else objective
    bar = tqdm(total=run.trials, initial=done, desc="trials", disable=not progress, unit="trial")
    status = Status(bar, study, run.deadline, progress)
    with phase.listening(status.phase if progress else lambda now: None), lagging(study):
        checked = 0.0
        while run.deadline is None or time.time() < run.deadline:
            if time.monotonic() - checked >= DEAD_CHECK_SECONDS:
                fail_dead_trials(study)
                checked = time.monotonic()
            trials = study.get_trials(deepcopy=False)
            done, running = len(counted(trials)), sum(t.state.name == "RUNNING" for t in trials)
            status.count(done)
            if done >= run.trials:
                break
            if done + running >= run.trials:  # the others' trials would complete the count: wait for them
                time.sleep(1.0)
                continue
            run_one(study, each)
    bar.close()


def run_one(study: optuna.Study, objective: Callable[[optuna.Trial], list[float]]) -> None:
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


@contextlib.contextmanager
def following(study: optuna.Study, run: Run, desc: str, progress: bool) -> Iterator[None]:
    """A progress bar following the study's count while the block runs trials elsewhere (worker processes, Ray
    actors), read every two seconds in a thread of its own."""
    from tqdm import tqdm

    stop = threading.Event()

    def follow(bar) -> None:
        status = Status(bar, study, run.deadline, progress)
        while not stop.wait(2.0):
            status.count(finished_trials(study))

    with tqdm(total=run.trials, initial=finished_trials(study), desc=desc, disable=not progress,
              unit="trial") as bar:
        thread = threading.Thread(target=follow, args=(bar,), daemon=True, name="autocomp-progress")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            bar.update(finished_trials(study) - bar.n)


class Status:
    """The progress bar's count and text: the study's front and hypervolume (read again only when the count of
    finished trials changed, and only where the bar is shown), the budget left, and the phase of the trial running
    in this process."""

    def __init__(self, bar, study: optuna.Study, deadline: float | None, shown: bool = True) -> None:
        self.bar, self.study, self.deadline, self.shown = bar, study, deadline, shown
        self.done: int | None = None
        self.front = self.now = ""

    def count(self, done: int) -> None:
        """Between trials: the count, and the front as it stands now (no trial runs here)."""
        self.bar.update(done - self.bar.n)
        if not self.shown:
            return
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
