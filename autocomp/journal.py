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

from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal._storage import JournalOperation

from autocomp.held import HeldWrites

HELD = {JournalOperation.SET_TRIAL_PARAM, JournalOperation.SET_TRIAL_USER_ATTR,
        JournalOperation.SET_TRIAL_SYSTEM_ATTR, JournalOperation.SET_STUDY_SYSTEM_ATTR}


class BatchedJournalStorage(HeldWrites, JournalStorage):
    """Optuna's journal storage, whose ``batched`` block appends its writes at once (see the module)."""

    def _land(self, writes: list[dict[str, Any]]) -> None:
        with self._thread_lock:
            self._append(writes)
            self._sync_with_backend()

    def _append(self, logs: list[dict[str, Any]] | None) -> None:
        """Append the lines a block holds (if any) to the file, in one append, and hold none."""
        if logs:
            self._backend.append_logs(logs)
            logs.clear()

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        logs = self.held()
        if logs is None or op_code not in HELD:
            self._append(logs)  # what the block holds first: the file keeps the order of the writes
            super()._write_log(op_code, extra_fields)
        else:
            logs.append({"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields})

    def _sync_with_backend(self) -> None:
        if not self.held():  # nothing held: read and replay the others' lines
            super()._sync_with_backend()
