"""Where a study lives: an Optuna storage from a URL, and the trials of workers that died.

Which storage for which scale (README, "Scaling out"):

- ``sqlite:///study.db``: one process (the default).
- ``journal:///study.journal``: many processes on one machine (``autocomp search --workers N``); Optuna's
  journal file storage, appended to under a file lock. A parallel search on a study YAML's SQLite file runs in the
  journal beside it (``shared``), its trials copied there first; from then on every command that names the
  YAML finds the study there (``located``).
- ``postgresql://user@host/db`` (or ``mysql://``): many machines. Workers send heartbeats; a trial
  whose worker stopped beating for ``GRACE_SECONDS`` is failed by the next worker that starts a trial.

Whatever the storage, a trial records the worker running it (``worker``: host, pid, process start
time). A worker that died on this host (``kill -9``, out of memory) is noticed at once: its RUNNING
trials are failed with the reason. Either way a failed trial of a dead worker is retried, at most
``MAX_RETRY`` times, as a WAITING copy of its parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from autocomp.errors import ConfigError
from autocomp.notes import renote

if TYPE_CHECKING:
    import optuna
    from optuna.trial import TrialState

JOURNAL = "journal:///"
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
MAX_RETRY = 2
SCHEMES = ("sqlite:///", JOURNAL, "postgresql", "mysql")


def _file(url: str) -> tuple[str, str] | None:
    """The scheme and file path of a SQLite or journal URL; None for a database server or SQLite in memory."""
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix) and url != "sqlite:///:memory:":
            return prefix, url[len(prefix):]
    return None


def resolve(url: str, folder: Path) -> str:
    """Anchor a relative SQLite or journal path at ``folder``; other URLs are returned unchanged."""
    file = _file(url)
    if file is None or file[1].startswith("/"):
        return url
    return file[0] + os.path.normpath(folder / file[1])


def check_url(url: str) -> None:
    if not url.startswith(SCHEMES):
        raise ConfigError(f"must start with one of {list(SCHEMES)}, but got {url!r}.", "storage")


def local_path(url: str) -> Path | None:
    """The file of a SQLite or journal storage; None for a database server."""
    file = _file(url)
    return None if file is None else Path(file[1])


def shared(url: str) -> str:
    """Where processes share a study whose storage is ``url``: the journal file beside a SQLite file (SQLite
    serves one process); other URLs unchanged."""
    path = local_path(url)
    return f"{JOURNAL}{path.with_suffix('.journal')}" if url.startswith("sqlite:///") and path else url


def holds(url: str, study_name: str) -> bool:
    """Whether the storage at ``url`` holds a study of that name (a missing file holds none)."""
    import optuna

    path = local_path(url)
    if path is not None and not path.exists():
        return False
    return study_name in optuna.get_all_study_names(storage=open_storage(url))


def located(url: str, study_name: str) -> str:
    """The storage a study YAML's ``url`` stands for: the journal beside its SQLite file once a parallel search
    moved the study there (``move_to_shared``), else ``url``."""
    journal = shared(url)
    return journal if journal != url and holds(journal, study_name) else url


def move_to_shared(url: str, study_name: str) -> str:
    """The storage a parallel search runs in for a study YAML's ``url``: the journal beside a SQLite file, the
    study's trials and attributes copied into it first (once); a database URL unchanged."""
    import optuna

    journal = shared(url)
    if journal != url and holds(url, study_name) and not holds(journal, study_name):
        optuna.copy_study(from_study_name=study_name, from_storage=open_storage(url), to_storage=open_storage(journal))
        renote(optuna.load_study(storage=open_storage(journal), study_name=study_name))  # trial ids changed
    return journal


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage behind ``url``: journal file, or a database with heartbeats, whose calls are tried again while it
    is locked or unreachable (``autocomp.patient``)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages.journal import JournalFileBackend

    from autocomp.journal import BatchedJournalStorage
    from autocomp.patient import PatientRDBStorage
    from autocomp.trial_rows import ThrottledCache

    check_url(url)
    if url.startswith(JOURNAL):
        return BatchedJournalStorage(JournalFileBackend(url[len(JOURNAL):]))
    engine = {"connect_args": {"timeout": 5}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return ThrottledCache(PatientRDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                                                grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=retry))


def artifact_store(folder: str):
    """Optuna's file-system artifact store in ``folder``, writing each artifact through a temporary file and a
    rename: a reader never sees half a file, and a trial records an artifact only once it is whole."""
    from optuna.artifacts import FileSystemArtifactStore

    from autocomp.cache import atomic_write

    class AtomicArtifactStore(FileSystemArtifactStore):
        def write(self, artifact_id: str, content_body) -> None:
            atomic_write(self._get_filepath(artifact_id), content_body.read())  # artifacts: megabytes at most

    return AtomicArtifactStore(folder)


def batched(study: optuna.Study) -> contextlib.AbstractContextManager:
    """A block whose writes of trial parameters and attributes land in one transaction, on a database
    (``autocomp.patient``), or in one append, on a journal file (``autocomp.journal``)."""
    storage = study._storage
    for held in (storage, getattr(storage, "_backend", None)):  # Optuna's cache in front of a database
        if hasattr(held, "batched"):
            return held.batched()
    return contextlib.nullcontext()


def holding(study: optuna.Study, key: str, value: object, states: tuple[TrialState, ...], unless: str) -> list[int]:
    """The numbers of the study's trials in ``states`` whose user attribute ``key`` is ``value`` and that have none
    named ``unless``, as the storage holds them now: on a database in one query (``autocomp.patient``), not from a
    worker's view of the study, which may lag a second (``autocomp.trial_rows``)."""
    backend = getattr(study._storage, "_backend", None)
    if hasattr(backend, "holding"):
        return backend.holding(study._study_id, states, key, value, unless)
    return [t.number for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get(key) == value and unless not in t.user_attrs]


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a WAITING copy of a trial whose worker died (bounded by ``MAX_RETRY``)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def this_worker() -> dict[str, object]:
    """What identifies this process among the workers of a study: host, pid and the process's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(worker: dict[str, object]) -> bool:
    """Whether the worker is still running; a worker on another host is assumed alive (heartbeats judge it)."""
    if worker.get("host") != socket.gethostname():
        return True
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return worker.get("started") is None or _start_time(pid) == worker["started"]


def fail_trial(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """Store a RUNNING trial as FAIL with ``reason`` ("Kind: message", its ``error`` and ``fault``); False if it had
    already finished."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    kind, _, message = reason.partition(": ")
    try:
        study._storage.set_trial_user_attr(trial_id, "error", reason)
        study._storage.set_trial_user_attr(trial_id, "fault", {"type": kind, "message": message, "phase": ""})
        return study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except UpdateFinishedTrialError:  # another worker finished it first
        return False


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail (and retry) the RUNNING trials whose worker died on this host; return their numbers."""
    return fail_running(study, _died)


def _died(trial: optuna.trial.FrozenTrial) -> str | None:
    worker = trial.user_attrs.get("worker")
    if worker is None or alive(worker):
        return None
    return f"WorkerDied: worker {worker['host']}:{worker['pid']} stopped in the middle of this trial"


def fail_running(study: optuna.Study, reason: Callable[[optuna.trial.FrozenTrial], str | None]) -> list[int]:
    """Fail, and queue again, the RUNNING trials ``reason`` gives a reason for (None: left running); return their
    numbers. A trial another worker finished or failed first is left as it is."""
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = reason(trial)
        if why is not None and fail_trial(study, trial._trial_id, why):
            retry(study, study._storage.get_trial(trial._trial_id))
            failed.append(trial.number)
    return failed
