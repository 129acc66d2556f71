"""Writes held per thread inside a ``batched`` block and landed together at its end: the one mechanism behind a
database's batch (one transaction, ``autocomp.patient``) and a journal file's (one append, ``autocomp.journal``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class HeldWrites:
    """A storage mixin: inside ``batched``, a thread's writes go to ``held()`` and land at the block's end through
    ``_land`` (a subclass's). A block inside another is part of it; a block that raises lands nothing it holds."""

    def held(self) -> list | None:
        """The writes this thread's block holds so far; None outside a block."""
        return getattr(self._held_by_thread(), "writes", None)

    def _held_by_thread(self) -> threading.local:
        return self.__dict__.setdefault("_held", threading.local())  # made at first use (and after unpickling)

    def _land(self, writes: list) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        if self.held() is not None:
            yield
            return
        held = self._held_by_thread()
        held.writes = []
        try:
            yield
        except BaseException:
            held.writes = None
            raise
        try:
            self._land(held.writes)
        finally:
            held.writes = None

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.pop("_held", None)
        return state
