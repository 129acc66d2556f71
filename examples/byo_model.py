"""Bring your own model: a task autocomp can search, from a model, data and a metric of your own.

A study names it as ``task: "examples.byo_model:task"`` (run from the repository root, or put the module on
``PYTHONPATH``). The teacher here is a small MLP for scikit-learn's breast cancer table, trained in a second;
the metric is balanced accuracy (the mean of per-class recall), higher is better.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from autocomp.tasks import Task
from autocomp.train import Split


class TabularMLP(nn.Module):
    def __init__(self, features: int = 30, hidden: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 30) -> (batch, 2) logits
        return self.net(x)


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes, in [0, 1]: logits (N, C) and labels (N,), as every autocomp metric."""
    predicted = logits.argmax(axis=1)
    return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))


def task() -> Task:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    x = (x - x[:340].mean(0)) / x[:340].std(0)  # standardised on the training rows
    train, val, test = Split(x[:340], y[:340]), Split(x[340:455], y[340:455]), Split(x[455:], y[455:])

    torch.manual_seed(0)
    teacher = TabularMLP()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(200):  # full batch; your own training loop, or load your checkpoint here
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(train.x), train.y).backward()
        optimizer.step()
    return Task("breast_cancer_mlp", teacher.eval(), train, val, test, example_input=train.x[:1],
                metric=balanced_accuracy)
