from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test session trains its teachers afresh into its own cache (subprocesses inherit it)."""
    path = Path(os.environ.get("AUTOCOMP_TEST_CACHE") or tmp_path_factory.mktemp("autocomp-cache"))
    os.environ["AUTOCOMP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def digits_task(teacher_cache: Path):
    from autocomp.tasks import load_task

    return load_task("digits")


@pytest.fixture(scope="session")
def mnist1d_task(teacher_cache: Path):
    from autocomp.tasks import load_task

    return load_task("mnist1d")


@pytest.fixture(scope="session")
def mnist1d_lean_task(teacher_cache: Path):
    from autocomp.tasks import load_task

    return load_task("mnist1d_lean")


class SmallCNN(nn.Module):
    """A fast model for unit tests: conv-BN-ReLU x2, a hidden Linear and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # (B, 16, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def prune_local(model: nn.Module, plan: dict[str, tuple[float, str]], data, example_input=None) -> nn.Module:
    """Prune ``model`` in place, one (sparsity, criterion) per layer, one-shot."""
    from autocomp.compress.prune import prunable_layers, prune
    from autocomp.recipe import LayerPrune, Prune

    example_input = torch.zeros(1, 1, 8, 8) if example_input is None else example_input
    spec = Prune(layers={name: LayerPrune(s, c) for name, (s, c) in plan.items()})
    return prune(model, example_input, spec, prunable_layers(model, example_input), data)
