"""What the running trial is doing now ("trial 12, screen: fine-tune epoch 2/3"), for the search's progress bar:
the trial's code says its stage and step, and whoever runs it in this process listens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_listeners: list[Callable[[str], None]] = []
_now = {"stage": "", "step": ""}


def stage(name: str) -> None:
    """A new stage of the work (its step cleared)."""
    _now.update(stage=name, step="")
    _tell()


def step(name: str) -> None:
    """A step within the current stage (a fine-tune epoch, the export, the measurement)."""
    _now["step"] = name
    _tell()


def now() -> str:
    """The phase's text now ("" before any)."""
    return ": ".join(filter(None, (_now["stage"], _now["step"])))


def _tell() -> None:
    text = now()
    for listener in _listeners:
        listener(text)


@contextlib.contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener`` with the phase's text whenever it changes, inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
