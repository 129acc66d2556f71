"""Task: what a study compresses (a trained teacher, its data, an example input and a metric)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp.train import Split, cross_entropy, fit, predict

# metric(logits (N, C), labels (N,)) -> float, higher is better
Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(axis=1) == labels).mean())


@dataclass
class Task:
    """A trained teacher plus train/val/test splits, an example input (1, ...) and a metric."""

    name: str
    teacher: nn.Module
    train: Split
    val: Split
    test: Split
    example_input: torch.Tensor
    metric: Metric = field(default=accuracy)

    def score(self, model: nn.Module, split: Split) -> float:
        """The metric of a torch ``model`` on ``split`` (the artifact is scored in measure.py)."""
        return self.metric(predict(model, split.x).numpy(), split.y.numpy())


def cache_dir() -> Path:
    """Where trained teachers are cached: ``$AUTOCOMP_CACHE`` or ``~/.cache/autocomp``."""
    return Path(os.environ.get("AUTOCOMP_CACHE", Path.home() / ".cache" / "autocomp"))


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
    """Train ``build()`` once with cross-entropy and cache its weights; later calls load them.

    The cache key holds the task key, the seed, the architecture and the training settings, so
    a change to any of them trains a new teacher instead of loading a stale one.
    """
    torch.manual_seed(seed)
    model = build()
    fingerprint = f"{model}|{epochs}|{lr}|{weight_decay}|{seed}|{len(train)}|{getattr(augment, '__name__', None)}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    path = cache_dir() / "teachers" / f"{key}-seed{seed}-{digest}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    fit(model, train, cross_entropy, epochs=epochs, lr=lr, weight_decay=weight_decay,
        augment=augment, seed=seed, desc=f"training {key} teacher")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return model.eval()
