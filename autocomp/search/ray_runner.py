"""The Ray Tune backend: the study's workers run as Ray Tune trials, on a cluster or a local Ray.

The study is the same Optuna study the local backend writes (storage, directions, metric names, user
attributes, artifacts, constraints, fidelity records), because each Tune trial is a worker of the study
(``autocomp.search.worker``), as a ``--workers`` process is:

- **One Tune trial per slot, many Optuna trials per Tune trial.** The driver starts as many Tune trials as trials
  should run at once (``--max-concurrent``, or the cluster's CPUs); each runs the worker's loop in its actor,
  sampling, running and telling Optuna trials until the study holds the count. Its actor starts once (torch, the
  task, the study opened), not once per Optuna trial, and no trial waits on the driver: Tune's per-trial
  scheduling left 32 slots half empty (x 0.52: ``benchmarks/results/load_2026-12-07.md``). Tune's ``OptunaSearch`` is
  not used: it records only the metrics Tune reports (no user attributes, no constraints), and a ``TuneConfig``
  metric would turn the multi-objective study into a single-objective one.
- **A trial is told once, by its worker**: COMPLETE with its values, PRUNED (screened out, over a cap) or
  FAIL with its reason, as ``study.optimize`` would. A worker that dies mid-trial (``kill -9``, a lost node) is
  started again by Tune, at most ``MAX_RETRY`` times; the trial it left running (its ``ray`` attribute names the
  search and the slot) is failed with the reason and queued again, as a dead ``--workers`` process's trial is,
  by the slot's next actor or, when the slot gives up, by the driver.
- **Artifacts and storage must reach every node**: the study's artifact folder and its storage are paths
  or URLs every node opens (a shared file system, or PostgreSQL for the storage). A node that cannot see
  the artifact folder fails its trial with that reason instead of writing files nobody will find.
- Ray's usage statistics are off; a Ray started for one search serves 127.0.0.1 alone (``on_loopback``), with no
  dashboard and a bounded object store.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import tune

from autocomp.errors import AutocompError
from autocomp.faults import record
from autocomp.search.trials import Run, finished_trials, open_study
from autocomp.search.worker import following, work
from autocomp.storage import MAX_RETRY, fail_running

if TYPE_CHECKING:
    import optuna

    from autocomp.search.objective import Objective

OBJECT_STORE_BYTES = 256 * 2**20  # a Ray started for one search: trials pass recipes and bytes, not tensors
FORWARDED_ENV = ("PYTHONPATH", "AUTOCOMP_CACHE")  # the driver's, so a worker imports and caches as it does
MARKER = ".autocomp-shared-"  # a file the driver writes in the artifact folder, which every node must see
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a Ray of one machine, on 127.0.0.1 (on_loopback)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a Ray of this machine for this search; "auto" or HOST:PORT: a cluster
    max_concurrent: int | None = None  # trials at once (default: as many as the cluster's CPUs allow)
    cpus_per_trial: float = 1.0

    def slots(self, left: int) -> int:
        """How many workers run at once: ``max_concurrent``, or as many as the cluster's CPUs hold; never more
        than the ``left`` trials to run."""
        fit = int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_trial)
        return max(0, min(left, self.max_concurrent or max(1, fit)))

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
    """Run the study's workers as Ray Tune trials until the study holds the count (or the deadline passed)."""
    search = uuid.uuid4().hex[:12]  # what marks this search's trials and its marker file
    marker = Path(run.spec.artifacts) / f"{MARKER}{search}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        with connected(options, progress):
            study = open_study(run.spec, create=False)
            slots = options.slots(run.trials - finished_trials(study))
            if slots:
                _tune(run, study, slots, options, teacher_onnx, search, progress)
    finally:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def connected(options: RayOptions, progress: bool) -> Iterator[None]:
    """This process connected to the cluster at ``options.address``, or to a Ray of this search's own on this
    machine (``on_loopback``), even where `ray start` left a cluster that ``ray.init()`` would join; disconnected
    (and that Ray stopped) after."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    local = options.address is None
    with on_loopback() if local else contextlib.nullcontext():
        try:
            ray.init(address=options.address or "local", runtime_env={"env_vars": env}, log_to_driver=progress,
                     **({"include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES} if local else {}))
        except ConnectionError as err:  # --address auto with no cluster on this machine
            raise AutocompError(f"--address {options.address}: {err}") from None
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def on_loopback() -> Iterator[None]:
    """Inside, a Ray started here serves 127.0.0.1 alone. Ray's servers (GCS, raylet, workers) listen on every
    interface of the address it picks for the machine, unless the machine is to hold no cluster of several nodes
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for Windows and macOS): then on 127.0.0.1. Ray reads it
    when imported, so this process's copy is set too; the processes Ray starts read it from the environment."""
    from ray._private import ray_constants

    before = os.environ.get(SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before[1]
        if before[0] is None:
            os.environ.pop(SINGLE_MACHINE, None)
        else:
            os.environ[SINGLE_MACHINE] = before[0]


def _tune(run: Run, study: optuna.Study, slots: int, options: RayOptions, teacher_onnx: bytes, search: str,
          progress: bool) -> None:
    """``slots`` Tune trials, each a worker of the study (``_slot``), followed until they end."""
    trainable = tune.with_resources(tune.with_parameters(_slot, run=run, teacher_onnx=teacher_onnx, search=search),
                                    {"cpu": options.cpus_per_trial})
    with tempfile.TemporaryDirectory(prefix="autocomp-tune-") as tmp:
        tuner = tune.Tuner(
            trainable, param_space={"slot": tune.grid_search(list(range(slots)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=slots),
            run_config=tune.RunConfig(name=run.spec.study_name, storage_path=tmp, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=MAX_RETRY)),
        )
        with following(study, run, f"trials (Ray, {slots} at once)", progress):
            results = tuner.fit()
    for result in results:
        if result.error is not None:
            _gave_up(study, search, result.config["slot"], result.error)


def _gave_up(study: optuna.Study, search: str, slot: int, error: BaseException) -> None:
    """Say why a slot stopped for good, and fail (and queue again) the trial it left running."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"autocomp: Ray worker {slot} stopped after {MAX_RETRY + 1} tries: {lines[-1][:300]}", file=sys.stderr)
    fail_running(study, _left_by(search, slot, f"WorkerDied: the Ray worker of slot {slot} died "
                                                f"{MAX_RETRY + 1} times, the last in the middle of this trial"))


def _left_by(search: str, slot: int, reason: str) -> Callable[[optuna.trial.FrozenTrial], str | None]:
    """``reason`` for a running trial of this search's ``slot`` (a slot runs one trial at a time), None for others."""
    def left(trial: optuna.trial.FrozenTrial) -> str | None:
        ray_attr = trial.user_attrs.get("ray", {})
        return reason if (ray_attr.get("search"), ray_attr.get("slot")) == (search, slot) else None
    return left


def _slot(config: dict, run: Run, teacher_onnx: bytes, search: str) -> None:
    """A Tune trial: a worker of the study in this actor (``autocomp.search.worker``), each of its Optuna trials
    marked with the search, the slot and the node. A trial the slot's last actor left running (it died) is failed
    and queued again first."""
    slot = config["slot"]
    folder = tempfile.mkdtemp(prefix="autocomp-ray-")
    atexit.register(shutil.rmtree, folder, True)
    reference = Path(folder) / "teacher.onnx"
    reference.write_bytes(teacher_onnx)
    study = open_study(run.spec, create=False)
    fail_running(study, _left_by(search, slot, f"WorkerDied: the Ray worker of slot {slot} stopped in the middle "
                                                "of this trial"))
    on_ray = {"node": ray.get_runtime_context().get_node_id(), "search": search, "slot": slot}
    artifacts = Path(run.spec.artifacts)

    def wrap(objective: Objective) -> Callable[[optuna.Trial], list[float]]:
        objective.tags["ray"] = on_ray  # stored with each trial's sampled recipe, in one write

        def trial_on_ray(trial: optuna.Trial) -> list[float]:
            try:
                check_shared(artifacts, f"{MARKER}{search}")
            except AutocompError as err:
                record(trial, err)
                raise
            return objective(trial)
        return trial_on_ray

    work(replace(run, reference=reference), slot, False, study=study, wrap=wrap)


def check_shared(artifacts: Path, marker: str) -> None:
    """Refuse to run a trial on a node that does not see the driver's marker file in the artifact folder: the
    files it wrote would be lost to the study."""
    if not (artifacts / marker).exists():
        raise AutocompError(f"the study's artifact folder {artifacts} is not shared with this node "
                            f"({socket.gethostname()}): put it on a file system every node mounts (README)")
