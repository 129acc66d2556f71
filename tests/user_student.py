"""A user's task module that brings its own student family, registered when the module is imported:
``task: "tests.user_student:task"`` with ``student: {family: tiny_mlp}``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from autocomp.compress.student import STUDENTS, Family
from autocomp.errors import check_range
from autocomp.tasks import Task
from tests.tasks import val_test_disagree


@dataclass
class TinyConfig:
    width: int = 8

    def __post_init__(self) -> None:
        check_range("width", self.width, 1, 1024)


def build_tiny(config: TinyConfig, task: Task) -> nn.Module:
    features = math.prod(task.example_input.shape[1:])
    return nn.Sequential(nn.Flatten(), nn.Linear(features, config.width), nn.ReLU(), nn.Linear(config.width, 10))


STUDENTS.add("tiny_mlp", Family(TinyConfig, build_tiny, {"width": [4, 8, 16]}), "a user's one-hidden-layer MLP")


def task() -> Task:
    torch.manual_seed(0)
    return val_test_disagree()
