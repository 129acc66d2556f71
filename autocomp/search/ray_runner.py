"""The Ray Tune backend: each trial of the study runs as a Ray Tune trial, on a cluster or a local Ray.

The study is the same Optuna study the local backend writes (storage, directions, metric names, user
attributes, artifacts, constraints, fidelity records), because each Tune trial runs the same objective
(``trials.make_objective``) on an Optuna trial of that study and tells the study itself:

- **The driver owns the count.** ``StudySearcher``, a Tune ``Searcher``, asks the study for a trial
  (``study.ask``: enqueued warm-start trials first) for each Tune trial, waits while the trials it
  started would complete the count, and finishes when the study holds it. Tune's ``OptunaSearch`` is not
  used: it records only the metrics Tune reports (no user attributes, no constraints), and a
  ``TuneConfig`` metric would turn the multi-objective study into a single-objective one. Tune is given no
  metric and no scheduler; early stopping is the study's own screening, told as PRUNED.
- **A trial is told once, by its worker**: COMPLETE with its values, PRUNED (screened out, over a cap) or
  FAIL with its reason, as ``study.optimize`` would. A worker that dies mid-trial (``kill -9``, a lost
  node) is retried by Tune on the same Optuna trial, at most ``MAX_RETRY`` times; a trial that keeps dying
  is stored FAIL with the reason by the driver.
- **Artifacts and storage must reach every node**: the study's artifact folder and its storage are paths
  or URLs every node opens (a shared file system, or PostgreSQL for the storage). A node that cannot see
  the artifact folder fails its trial with that reason instead of writing files nobody will find.
- **Actors are reused**: a Tune trial runs in the actor (process) of a trial that ended, so a process is started
  per concurrent trial, not per trial (each new one imports torch and the task: seconds of a small trial), and
  opens the study and loads the task once for all the trials it runs.
- Ray's usage statistics are off; a Ray started for one search has no dashboard and a bounded object store.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import tune
from ray.tune.search import Searcher

from autocomp.errors import AutocompError
from autocomp.search.trials import SEED_STRIDE, Run, counted, make_objective, make_sampler, open_study, tell
from autocomp.storage import MAX_RETRY, fail_trial

if TYPE_CHECKING:
    import optuna

    from autocomp.search.objective import Objective

OBJECT_STORE_BYTES = 256 * 2**20  # a Ray started for one search: trials pass recipes and bytes, not tensors
FORWARDED_ENV = ("PYTHONPATH", "AUTOCOMP_CACHE")  # the driver's, so a worker imports and caches as it does
MARKER = ".autocomp-shared-"  # a file the driver writes in the artifact folder, which every node must see


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a Ray of this machine for this search; "auto" or HOST:PORT: a cluster
    max_concurrent: int | None = None  # trials at once (default: as many as the cluster's CPUs allow)
    cpus_per_trial: float = 1.0

    def check(self) -> None:
        """Refuse, in one line, an address where no Ray cluster answers (Ray itself retries for minutes)."""
        if self.address in (None, "auto"):
            return
        host, _, port = self.address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise AutocompError(f"--address must be 'auto' or the HOST:PORT of a running Ray cluster's head, but "
                                f"nothing answers at {self.address!r} ({err}); start one with `ray start --head`."
                                ) from None


def run_tune(run: Run, options: RayOptions, teacher_onnx: bytes, progress: bool) -> None:
    """Run the study's trials as Ray Tune trials until the searcher has the count (or the deadline passed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    marker = Path(run.spec.artifacts) / f"{MARKER}{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    local = options.address is None
    try:
        try:
            # "local": a Ray of this search's own, even where `ray start` left a cluster that ray.init would join
            ray.init(address=options.address or "local", runtime_env={"env_vars": env}, log_to_driver=progress,
                     **({"include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES} if local else {}))
        except ConnectionError as err:  # --address auto with no cluster on this machine
            raise AutocompError(f"--address {options.address}: {err}") from None
        study = open_study(run.spec, create=False)
        study.sampler = make_sampler(run.spec, run.seed)  # asks as the trials' samplers sample (NSGA-II generations)
        trainable = tune.with_resources(tune.with_parameters(_trainable, run=run, teacher_onnx=teacher_onnx,
                                                             marker=marker.name),
                                        {"cpu": options.cpus_per_trial})
        with tempfile.TemporaryDirectory(prefix="autocomp-tune-") as tmp:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=StudySearcher(run, study), num_samples=-1,
                                            max_concurrent_trials=options.max_concurrent, reuse_actors=True),
                run_config=tune.RunConfig(name=run.spec.study_name, storage_path=tmp, verbose=1 if progress else 0,
                                          failure_config=tune.FailureConfig(max_failures=MAX_RETRY)),
            )
            tuner.fit()
    finally:
        marker.unlink(missing_ok=True)
        ray.shutdown()


class StudySearcher(Searcher):
    """Tune's view of the study: one Optuna trial per Tune trial, until the study holds ``run.trials``."""

    def __init__(self, run: Run, study: optuna.Study) -> None:
        super().__init__()  # no metric, no mode: the study's own directions rank trials
        self.run, self.study = run, study
        self.live: dict[str, int] = {}  # Tune trial id -> Optuna trial number, for trials not yet ended

    def suggest(self, trial_id: str) -> dict | str | None:
        done = len(counted(self.study.get_trials(deepcopy=False)))
        if done >= self.run.trials or (self.run.deadline is not None and time.time() >= self.run.deadline):
            return self.FINISHED
        if done + len(self.live) >= self.run.trials:  # the running trials would complete the count
            return None
        trial = self.study.ask()
        self.live[trial_id] = trial.number
        return {"optuna_trial_id": trial._trial_id, "optuna_trial": trial.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.live.pop(trial_id, None)
        if number is None or not error:
            return
        trial = self.study.get_trials(deepcopy=False)[number]
        if trial.state.name == "RUNNING":  # its worker died every time Tune ran it
            fail_trial(self.study, trial._trial_id, f"WorkerDied: the Ray worker running this trial died "
                                                    f"{MAX_RETRY + 1} times (Tune trial {trial_id})")


_SERVED: dict[str, tuple[optuna.Study, Objective]] = {}  # this worker process's study and objective, by search


def _served(run: Run, teacher_onnx: bytes, marker: str) -> tuple[optuna.Study, Objective]:
    """The study and objective of the search ``marker`` names, opened once per worker process (Tune reuses its
    actors: opened at every trial, a journal is read again from its start and the task is loaded again)."""
    if marker not in _SERVED:
        _SERVED.clear()  # a reused process serves one search at a time
        folder = tempfile.mkdtemp(prefix="autocomp-ray-")
        atexit.register(shutil.rmtree, folder, True)
        reference = Path(folder) / "teacher.onnx"
        reference.write_bytes(teacher_onnx)
        study = open_study(run.spec, create=False)
        _SERVED[marker] = study, make_objective(replace(run, reference=reference), study)
    return _SERVED[marker]


def _trainable(config: dict, run: Run, teacher_onnx: bytes, marker: str) -> dict:
    """One Tune trial: the objective on the Optuna trial the searcher asked for, told to the study here."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, scored = _served(run, teacher_onnx, marker)
    number = config["optuna_trial"]
    if study._storage.get_trial(config["optuna_trial_id"]).state.name != "RUNNING":  # the driver failed it
        return {"optuna_trial": number, "state": "already told"}
    trial = optuna.Trial(study, config["optuna_trial_id"])  # samples at its first suggest, with the sampler below

    def objective(trial: optuna.Trial) -> list[float]:
        attempt = trial.user_attrs.get("ray", {}).get("attempt", 0) + 1  # Tune retries a trial whose worker died
        trial.set_user_attr("ray", {"node": ray.get_runtime_context().get_node_id(), "attempt": attempt})
        check_shared(Path(run.spec.artifacts), marker)
        # the proxy sampler scores through the objective; a retry samples again, alike
        study.sampler = make_sampler(run.spec, run.seed + SEED_STRIDE * number, scored)
        return scored(trial)

    state = tell(study, trial, objective)
    return {"optuna_trial": number, "state": state}


def check_shared(artifacts: Path, marker: str) -> None:
    """Refuse to run a trial on a node that does not see the driver's marker file in the artifact folder: the
    files it wrote would be lost to the study."""
    if not (artifacts / marker).exists():
        raise AutocompError(f"the study's artifact folder {artifacts} is not shared with this node "
                            f"({socket.gethostname()}): put it on a file system every node mounts (README)")
