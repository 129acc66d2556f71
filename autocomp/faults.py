"""What can go wrong inside a trial, said so that the study records it and goes on: a training loss that is no
longer finite (caught at the step), a trial past its time limit, and any other error, each stored as the trial's
``fault`` (type, message, phase) beside its ``error`` line."""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import Tensor, nn

from autocomp import phase

if TYPE_CHECKING:
    import optuna


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite."""


class TrialTimeout(TimeoutError):
    """The trial ran past the study's ``trial_timeout``."""

    said = "the trial ran past its time limit (trial_timeout)"

    def __str__(self) -> str:
        return self.said


class FiniteLoss(nn.Module):
    """``loss_fn`` whose every value is checked: a NaN or infinite loss raises ``NonFiniteLoss`` at that step, before
    the optimizer spreads it into the weights. A module, so that ``fit`` trains the wrapped loss's own parameters."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, *args) -> Tensor:
        loss = self.loss_fn(*args)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} ({phase.now() or 'training'})")
        return loss


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "the trial", limit: float | None = None) -> Iterator[None]:
    """Raise ``TrialTimeout`` in this thread once ``seconds`` have passed inside the block (None: no limit);
    ``limit`` is the limit the message names (default ``seconds``: a block may get what is left of it).

    A timer thread raises it asynchronously (``PyThreadState_SetAsyncExc``), so the limit holds in any thread: the
    main thread of a worker process and Ray Tune's trial threads alike. Python checks for it between bytecodes: a
    single long native call (one torch operation, one ONNX Runtime run) ends first, and so does an import (one cut
    short would leave its module half made for every later trial of the process)."""
    if seconds is None:
        yield
        return
    target = threading.get_ident()
    said = f"{what} ran past its {seconds if limit is None else limit:g} s limit (trial_timeout)"
    expired = type("TrialTimeout", (TrialTimeout,), {"said": said})
    done = threading.Event()
    lock = threading.Lock()  # the timer raises only while the block runs

    def expire() -> None:
        while importing(target) and not done.is_set():  # an import cut short leaves its module half made
            time.sleep(0.05)
        with lock:
            if not done.is_set():
                expired.said += f", {phase.now() or 'running'}"
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(expired))

    timer = threading.Timer(max(seconds, 0.0), expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            done.set()
        timer.cancel()


def importing(thread: int) -> bool:
    """Whether the thread ``thread`` is inside an import now (a frame of importlib's on its stack)."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def fault(err: BaseException) -> dict[str, str]:
    """What a failed trial stores as its ``fault``: the error's type and message, and the phase it failed in."""
    lines = str(err).strip().splitlines()
    return {"type": type(err).__name__, "message": (lines[0] if lines else "")[:500], "phase": phase.now()}


def record(trial: optuna.Trial, err: BaseException) -> None:
    """Store ``err`` as the trial's failure reason (``error``, "Kind: message") and ``fault`` (``fault``), unless a
    block nearer the error stored one already."""
    if "error" not in trial.user_attrs:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        trial.set_user_attr("fault", fault(err))
