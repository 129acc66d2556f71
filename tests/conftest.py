from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# two pytest-xdist processes train at once, each with autocomp's fixed 2 threads (autocomp.train.TRAIN_THREADS) on
# this machine's 2 cores: threads that wait sleep instead of spinning (before torch loads, and for subprocesses)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml
from torch import nn

from autocomp.recipe import Measure
from tests.postgres import PACKAGE_MISSING, Server, bindir, local_server

ROOT = Path(__file__).resolve().parents[1]
# for tests of what a recipe builds, not of its latency (tests/test_latency.py): the shortest timing of the artifact
# (the protocol's least rounds, any interval accepted)
QUICK_MEASURE = Measure(warmup_seconds=0.0, tolerance=0.5, max_seconds=0.1, min_seconds=0.0, sessions=1, rounds=3)
QUICK_MEASURE_YAML = ("measure: {warmup_seconds: 0.0, tolerance: 0.5, max_seconds: 0.1, min_seconds: 0.0, sessions: 1, "
                      "rounds: 3}\n")


# trained teachers kept between test runs: a teacher's file is named by the digest of everything that trains it
# (``autocomp.tasks.base.cached_model``), so a changed teacher trains afresh; test_tasks.py tests that contract
TEACHERS = Path(os.environ.get("AUTOCOMP_TEST_TEACHERS") or Path.home() / ".cache" / "autocomp-tests" / "teachers")


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test session's own cache (subprocesses inherit it: ``AUTOCOMP_CACHE``), whose teachers are the ones
    kept between runs (``TEACHERS``); ``AUTOCOMP_TEST_CACHE`` names a whole cache to use instead."""
    path = os.environ.get("AUTOCOMP_TEST_CACHE")
    if path is None:
        path = tmp_path_factory.mktemp("autocomp-cache")
        TEACHERS.mkdir(parents=True, exist_ok=True)
        (path / "teachers").symlink_to(TEACHERS, target_is_directory=True)
    os.environ["AUTOCOMP_CACHE"] = str(path)
    return Path(path)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """A PostgreSQL server from the OS packages, started on 127.0.0.1 for the session (``tests.postgres``)."""
    if bindir() is None:
        pytest.skip(PACKAGE_MISSING)
    with local_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: Server) -> str:
    """A database of the session's PostgreSQL server."""
    return postgres_server.database("studies")


def short_joint_space(folder: Path, epochs: int) -> Path:
    """The shipped joint space with fine-tunes of 1 to ``epochs`` epochs, written to ``folder/space.yaml``."""
    space = yaml.safe_load((ROOT / "search_spaces" / "joint.yaml").read_text())
    space["finetune"]["epochs"] = {"low": 1, "high": epochs}
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    return folder / "space.yaml"


@pytest.fixture
def quick_study(tmp_path: Path) -> Path:
    """The shipped joint space on digits with one-epoch fine-tunes and short timings."""
    short_joint_space(tmp_path, 1)
    path = tmp_path / "quick.yaml"
    path.write_text("schema_version: 1\nstudy_name: quick\ntask: digits\nspace: space.yaml\ntrials: 4\n"
                    "population_size: 4\n" + QUICK_MEASURE_YAML)
    return path


@pytest.fixture(scope="session")
def searched_e2e(tmp_path_factory: pytest.TempPathFactory, teacher_cache: Path) -> tuple[Path, str]:
    """A study YAML (the shipped joint space with fine-tunes of 1-2 epochs, digits, 3 trials) that `autocomp
    search` ran once, as a user runs it, and the search's stdout; the end-to-end and the dashboard tests read it."""
    folder = tmp_path_factory.mktemp("e2e")
    short_joint_space(folder, 2)
    path = folder / "e2e.yaml"
    path.write_text("schema_version: 1\nstudy_name: e2e\ntask: digits\nspace: space.yaml\ntrials: 3\n"
                    "population_size: 4\n" + QUICK_MEASURE_YAML)
    command = [str(Path(sys.executable).parent / "autocomp"), "search", str(path), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return path, result.stdout


@pytest.fixture(scope="session")
def digits_task(teacher_cache: Path):
    from autocomp.tasks.load import load_task

    return load_task("digits")


@pytest.fixture(scope="session")
def mnist1d_task(teacher_cache: Path):
    from autocomp.tasks.load import load_task

    return load_task("mnist1d")


@pytest.fixture(scope="session")
def mnist1d_lean_task(teacher_cache: Path):
    from autocomp.tasks.load import load_task

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
