"""Task: what a study compresses (a trained teacher, its data, an example input and a metric)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from autocomp import cache, kernels
from autocomp.train import Split, cross_entropy, deterministic, fit, predict

# metric(logits (N, C), labels (N,)) -> float, higher is better
Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(axis=1) == labels).mean())


@dataclass
class Task:
    """A trained teacher plus train/val/test splits, an example input (1, ...) and a metric; ``students`` names the
    student families that fit its data (``autocomp methods``; empty: every family its input can take), to which a
    study narrows a space's ``student.family``; ``teachers`` are extra trained teachers of the same data and
    classes, whose soft targets the ``multi_teacher`` distillation mode averages with the teacher's;
    ``early_teacher`` returns the teacher's state dict early in its training, to which lottery-ticket rewinding
    (``prune.init: rewind``) resets the kept weights (None: the task has none, and rewinding is refused)."""

    name: str
    teacher: nn.Module
    train: Split
    val: Split
    test: Split
    example_input: torch.Tensor
    metric: Metric = field(default=accuracy)
    students: tuple[str, ...] = ()
    teachers: tuple[nn.Module, ...] = ()
    early_teacher: Callable[[], dict[str, torch.Tensor]] | None = None
    _train_logits: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def teacher_logits(self) -> torch.Tensor:
        """The teacher's logits on the training split, in order: predicted once, then shared by every fine-tune
        of the process (distillation reads them by index instead of running the teacher on every step)."""
        if self._train_logits is None:
            with deterministic():
                self._train_logits = predict(self.teacher, self.train.x)
        return self._train_logits

    def score(self, model: nn.Module, split: Split) -> float:
        """The metric of a torch ``model`` on ``split`` (the artifact is scored in measure.py)."""
        return self.metric(predict(model, split.x).numpy(), split.y.numpy())

    def fingerprint(self) -> dict[str, str]:
        """Digests of the teacher's weights and of the data splits, which a recipe's replay must match."""
        prints = {"teacher_sha256": weights_digest(self.teacher), "data_sha256": self.data_digest(),
                  "cpu": machine_cpu(), "kernels": kernels.in_use()}
        if self.teachers:  # only where given: the fingerprints of tasks without them stay as they were
            prints["teachers_sha256"] = digest(t for model in self.teachers for t in ordered_state(model))
        return prints

    def data_digest(self) -> str:
        """SHA-256 of the data splits (``digest``), the fingerprint's ``data_sha256``."""
        return digest(t for split in (self.train, self.val, self.test) for t in (split.x, split.y))


def ordered_state(model: nn.Module) -> list[torch.Tensor]:
    """A model's state tensors in name order."""
    state = model.state_dict()
    return [state[k] for k in sorted(state)]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (``digest``)."""
    return digest(ordered_state(model))


def machine_cpu() -> str:
    """This machine's CPU model and widest vector unit: training is reproducible on one CPU model, but another
    one runs other vectorised kernels and trains other last bits (README, "Training is deterministic")."""
    info = kernels.cpu_info()
    if not info:
        return platform.processor() or platform.machine()
    flags = info.get("flags", "").split()
    vector = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "asimd") if f in flags), "scalar")
    return f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}, {vector}"


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes, in order."""
    sha = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        sha.update(f"{tuple(t.shape)}{t.dtype}".encode())
        sha.update(t.numpy().tobytes())
    return sha.hexdigest()


def cache_dir() -> Path:
    """Where trained teachers are cached: ``$AUTOCOMP_CACHE`` or ``~/.cache/autocomp``."""
    return Path(os.environ.get("AUTOCOMP_CACHE", Path.home() / ".cache" / "autocomp"))


def source_digest(modules: Iterable[ModuleType]) -> str:
    """A digest of the source of ``modules``: a cached model's key holds that of the code that trains it."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:12]


@functools.cache
def _training_code() -> str:
    """A digest of the source that trains a teacher: the module of ``fit`` (``autocomp.train``)."""
    return source_digest([inspect.getmodule(fit)])


def cached_model(name: str, model: nn.Module, trains: str, train: Callable[[nn.Module], object]) -> nn.Module:
    """``model`` (freshly built) trained by ``train`` once, its weights cached; later calls load them.

    The file is named by ``name`` and a digest of the architecture, ``trains`` (everything else that decides the
    weights: the settings, the data, the training code) and the kernels in use (``kernels.in_use``: other kernels
    train other bits), so a change to any of them trains afresh instead of loading stale weights. A user's task can
    cache its own teacher so, trained its own way.
    """
    fingerprint = f"{model}|{trains}|{kernels.in_use()}"
    path = cache_dir() / "teachers" / f"{name}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}.pt"

    def load() -> dict | None:
        return cache.read(path, lambda data: torch.load(io.BytesIO(data), weights_only=True), f"weights of {name}")

    state = load()
    if state is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # processes starting at once (workers, searches) train it once
            state = load()
            if state is None:
                train(model)
                weights = io.BytesIO()
                torch.save(model.state_dict(), weights)
                cache.write(path, weights.getvalue())  # atomic, with its digest (autocomp.cache)
                return model.eval()
    model.load_state_dict(state)
    return model.eval()


@dataclass(frozen=True)
class TeacherTraining:
    """How a built-in teacher is trained (``cached_teacher``): ``build()`` trained with cross-entropy on ``train``."""

    key: str
    build: Callable[[], nn.Module]
    train: Split
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    augment: Callable | None = None

    def settings(self) -> str:
        """Everything but the architecture that decides the weights: the settings, the data, the training code."""
        return (f"{self.epochs}|{self.lr}|{self.weight_decay}|{self.seed}|{digest([self.train.x, self.train.y])}|"
                f"{getattr(self.augment, '__name__', None)}|{_training_code()}")

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.build()

    def fit(self, model: nn.Module, on_epoch_end: Callable | None = None, desc: str = "") -> None:
        fit(model, self.train, cross_entropy, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
            augment=self.augment, seed=self.seed, on_epoch_end=on_epoch_end,
            desc=desc or f"training {self.key} teacher")


def cached_teacher(
    key: str,
    build: Callable[[], nn.Module],
    train: Split,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    augment: Callable | None = None,
) -> nn.Module:
    """Train ``build()`` once with cross-entropy (``train.fit``) and cache its weights (``cached_model``: keyed by
    the task key, the seed, the architecture, the training settings, a digest of the training data and of the
    training code, and the kernels in use). Training is deterministic, so a fresh machine with a CPU of the same
    vendor trains the same weights (README, "Training is deterministic")."""
    training = TeacherTraining(key, build, train, epochs, lr, weight_decay, seed, augment)
    return cached_model(f"{key}-seed{seed}", training.model(), training.settings(), training.fit)


REWIND_SHARE = 0.1  # the early checkpoint of a built-in teacher: after this share of its epochs (at least one)


class _Early(Exception):
    """Ends a teacher's training at its early checkpoint."""


def early_teacher(key: str, build: Callable[[], nn.Module], train: Split, *, epochs: int, lr: float,
                  weight_decay: float, seed: int, augment: Callable | None = None,
                  share: float = REWIND_SHARE) -> Callable[[], dict[str, torch.Tensor]]:
    """The state of the teacher ``cached_teacher`` trains with the same arguments after ``share`` of its epochs (at
    least one, before the last): the checkpoint lottery-ticket rewinding resets kept weights to
    (``Task.early_teacher``). Training is deterministic, so the teacher's own training, run again up to there on
    first use and then cached (the epoch in the key, beside the teacher's file), reaches it."""
    training = TeacherTraining(key, build, train, epochs, lr, weight_decay, seed, augment)
    epoch = min(max(round(share * training.epochs), 1), training.epochs - 1)

    def stop_early(model: nn.Module) -> None:
        done = [0]

        def after_epoch(_generator: torch.Generator) -> None:
            done[0] += 1
            if done[0] == epoch:
                raise _Early

        with contextlib.suppress(_Early):
            training.fit(model, on_epoch_end=after_epoch, desc=f"training {key} teacher to its early checkpoint "
                                                               f"(epoch {epoch} of {training.epochs}, for rewinding)")

    @functools.cache
    def load() -> dict[str, torch.Tensor]:
        name = f"{training.key}-seed{training.seed}-early"
        return cached_model(name, training.model(), f"{training.settings()}|early {epoch}/{training.epochs}",
                            stop_early).state_dict()

    return load
