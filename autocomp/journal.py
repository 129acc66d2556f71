"""A journal file whose batch of writes lands in one append.

Optuna's ``JournalStorage`` appends each write to the file on its own (the file's lock taken, the line written, then
every line other workers appended since read and replayed): a trial's 32 sampled parameters and some 30 attributes
were 60 appends, and, at 32 workers, the lock and the appends were a third of a worker's CPU. Inside ``batched``
(``autocomp.storage.batched``: the sampled recipe, then the results) the writes of trial parameters and trial and
study attributes are held, and land in one append, under one lock, followed by one read of the others' lines. What
a batch holds is not read back before it lands (as on a database, ``autocomp.patient``); any other write inside it
lands the batch first, so the file keeps the order of the writes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal._storage import JournalOperation

HELD = {JournalOperation.SET_TRIAL_PARAM, JournalOperation.SET_TRIAL_USER_ATTR,
        JournalOperation.SET_TRIAL_SYSTEM_ATTR, JournalOperation.SET_STUDY_SYSTEM_ATTR}


class BatchedJournalStorage(JournalStorage):
    """Optuna's journal storage, whose ``batched`` block appends its writes at once (see the module)."""

    def __init__(self, backend) -> None:
        self._held = threading.local()  # the lines held by this thread's ``batched`` block, if any
        super().__init__(backend)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_held"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state["_held"] = threading.local()
        super().__setstate__(state)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Hold this thread's writes of parameters and attributes inside, and append them at the end (a block
        inside another is part of it)."""
        if getattr(self._held, "logs", None) is not None:
            yield
            return
        self._held.logs = []
        try:
            yield
        except BaseException:  # all of the block's writes or none (those it landed before another write stay)
            self._held.logs = None
            raise
        with self._thread_lock:
            try:
                self._land()
            finally:
                self._held.logs = None
            self._sync_with_backend()

    def _land(self) -> None:
        logs = getattr(self._held, "logs", None)
        if logs:
            self._backend.append_logs(logs)
            logs.clear()

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        logs = getattr(self._held, "logs", None)
        if logs is None or op_code not in HELD:
            self._land()  # what the block holds first: the file keeps the order of the writes
            super()._write_log(op_code, extra_fields)
        else:
            logs.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})

    def _sync_with_backend(self) -> None:
        if not getattr(self._held, "logs", None):  # nothing held: read and replay the others' lines
            super()._sync_with_backend()
