"""A study's database, tried again while it is locked or unreachable, and written in batches.

- **Tried again**: a SQLite file another process holds, a PostgreSQL server restarting. Each call of Optuna's
  RDBStorage is retried with backoff for ``patience()`` seconds, then fails in one line (``StorageUnavailable``).
  A call either completes or raises: a trial whose writes could not complete stays RUNNING, and its worker stops;
  the next search fails it as a dead worker's trial (``autocomp.storage.fail_dead_trials``) and queues it again.
- **Batched**: Optuna writes each parameter and attribute of a trial in a transaction of its own (a trial of the
  joint space: some 70). Inside ``batched()`` a thread's writes of trial parameters and attributes (and of the
  study's system attributes, where a trial's note goes) are held and committed in one transaction at its end, one
  statement per table (``autocomp.trial_rows``): a trial's sampled recipe lands at once, and so do its metrics with
  every attribute the dashboard shows; a fault in between leaves none of them.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError

from autocomp.errors import AutocompError
from autocomp.held import HeldWrites
from autocomp.trial_rows import (
    STUDY_SYSTEM_ATTRS,
    SYSTEM_ATTRS,
    USER_ATTRS,
    Attr,
    Param,
    holding,
    read_trials,
    write_rows,
)

MAX_DELAY = 8.0  # seconds between two tries at most


class StorageUnavailable(AutocompError):
    """The study's database stayed locked or unreachable for ``patience()`` seconds."""


def patience() -> float:
    """Seconds a call is tried again (``AUTOCOMP_STORAGE_PATIENCE``, default 60)."""
    return float(os.environ.get("AUTOCOMP_STORAGE_PATIENCE", "60"))


def transient(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a database that could not be reached or was locked: worth trying
    again, unlike an error of the data itself."""
    return any(isinstance(e, (OperationalError, InterfaceError, DisconnectionError)) for e in causes(err))


def causes(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or while handling, innermost last (Optuna's storage raises its own
    error from SQLAlchemy's, which may be raised while handling the database's)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def created_meanwhile(err: BaseException) -> bool:
    """Whether ``err`` is another process creating the same tables first (two processes opening a new database at
    once both create Optuna's schema): worth opening again, which finds them."""
    return isinstance(err, IntegrityError) and "already exists" in str(err)


def patiently(method: Callable, worth_again: Callable[[BaseException], bool] = transient) -> Callable:
    """``method`` of an RDBStorage, tried again with backoff (0.25 s, doubling to ``MAX_DELAY``) while its error is
    ``worth_again`` (``transient``), for ``patience()`` seconds; then ``StorageUnavailable``."""
    @functools.wraps(method)
    def call(self: RDBStorage, *args, **kwargs):
        began, delay, tries = time.monotonic(), 0.25, 0
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as err:
                tries += 1
                waited = time.monotonic() - began
                if not worth_again(err):
                    raise
                if waited >= patience():
                    cause = str(err.__cause__ or err).strip().splitlines()
                    url = getattr(self, "url", None) or (args[0] if args else "?")  # __init__ sets it
                    raise StorageUnavailable(
                        f"the study's storage {redacted(url)} stayed unavailable for {waited:.0f} s ({tries} "
                        f"{'try' if tries == 1 else 'tries'}): {cause[0] if cause else type(err).__name__}") from err
                time.sleep(max(0.0, min(delay, patience() - waited)))
                delay = min(2 * delay, MAX_DELAY)
    return call


class PatientRDBStorage(HeldWrites, RDBStorage):
    """Optuna's RDBStorage whose every public method, and the private ones Optuna's cache in front of it calls,
    is tried again while the database is locked or unreachable (``patiently``), and so is opening it."""

    def __init__(self, url: str, **kwargs) -> None:
        patiently(RDBStorage.__init__, lambda err: transient(err) or created_meanwhile(err))(self, url, **kwargs)

    def _land(self, writes: list[Param | Attr]) -> None:
        """A ``batched`` block's writes, in one transaction (``autocomp.held``)."""
        if writes:
            self._commit(writes)

    @patiently
    def _get_trials(self, study_id: int, states, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        """What Optuna's ``_get_trials`` reads (its cache's read of new and unfinished trials), in plain queries
        (``autocomp.trial_rows``: a third of the ORM's CPU)."""
        with self.engine.connect() as connection:
            return read_trials(connection, study_id, states, included_trial_ids, trial_id_greater_than)

    @patiently
    def holding(self, study_id: int, states: Iterable[TrialState], key: str, value: Any, unless: str) -> list[int]:
        """The numbers of the trials in ``states`` whose user attribute ``key`` is ``value`` and that have none
        named ``unless`` (``autocomp.trial_rows.holding``)."""
        with self.engine.connect() as connection:
            return holding(connection, study_id, states, key, value, unless)

    @patiently
    def _commit(self, writes: list[Param | Attr]) -> None:
        with self.engine.begin() as connection:  # one transaction: all of them or none
            write_rows(connection, writes)

    def _write(self, write: Param | Attr) -> None:
        """``write`` now, in a transaction of its own, or held for the batch this thread is in."""
        held = self.held()
        if held is None:
            self._commit([write])
        else:
            held.append(write)

    def _set_trial_param(self, trial_id: int, name: str, value: float, distribution, previous=None) -> None:
        self._write(Param(trial_id, name, value, distribution, previous))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(Attr(USER_ATTRS, trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._write(Attr(SYSTEM_ATTRS, trial_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._write(Attr(STUDY_SYSTEM_ATTRS, study_id, key, value))


_SKIP = {"remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "upgrade",
         "get_current_version", "get_head_version", "get_all_versions"}
_PRIVATE = {"_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids"}  # (its _get_trials and writes: above)
for _name, _method in list(vars(RDBStorage).items()):
    _wrap = callable(_method) and not isinstance(_method, (staticmethod, classmethod))
    if _wrap and _name not in vars(PatientRDBStorage) and _name not in _SKIP \
            and (_name in _PRIVATE or not _name.startswith("_")):
        setattr(PatientRDBStorage, _name, patiently(_method))


def redacted(url: str) -> str:
    """``url`` without its password."""
    head, at, tail = url.rpartition("@")
    scheme, _, user = head.partition("//")
    if not at or ":" not in user:
        return url
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"
