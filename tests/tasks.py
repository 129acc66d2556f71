"""User tasks for tests, loaded as a user would: ``task: "tests.tasks:NAME"`` (untrained, built in milliseconds)."""

from __future__ import annotations

import time

import torch
from torch import nn

from autocomp.tasks import Task
from autocomp.train import Split, cross_entropy, fit, predict
from tests.conftest import SmallCNN


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def val_test_disagree() -> Task:
    """Validation labels are the teacher's own predictions, test labels never are: a trial scores
    100% on validation and 0% on test, so any mix-up of the splits shows."""
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    x_val, x_test = _inputs(64, 1), _inputs(64, 2)
    val = Split(x_val, predict(teacher, x_val).argmax(1))
    test = Split(x_test, (predict(teacher, x_test).argmax(1) + 1) % 10)
    return Task("val_test_disagree", teacher, Split(_inputs(64, 0), torch.zeros(64, dtype=torch.long)), val, test,
                example_input=x_val[:1])


class FixedView(SmallCNN):
    """A model whose forward hard-codes its width (``view(-1, 256)``): it breaks once conv2's channels go."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.reshape(-1, 256))))


class TrainFixedView(FixedView):
    """``FixedView`` whose hard-coded width only shows in training mode: the probe of prunable groups runs the
    model in eval mode and cannot see it, so every trial that prunes conv1 fails in its fine-tune."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.conv1.out_channels != 8:
            raise ValueError(f"this model trains with 8 channels after conv1, not {self.conv1.out_channels}")
        return super().forward(x)


def fixed_view() -> Task:
    torch.manual_seed(0)
    data = Split(_inputs(64, 0), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0)))
    return Task("fixed_view", TrainFixedView().eval(), data, data, data, example_input=data.x[:1])


def blobs(n: int, seed: int) -> Split:
    """Two Gaussian blobs in 4 dimensions, 6 standard deviations apart: a small MLP separates them within an epoch."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return Split(torch.randn(n, 4, generator=g) + 3.0 * (2 * y[:, None] - 1), y)


def plateau() -> Task:
    """An MLP that separates ``blobs`` perfectly: a fine-tune's validation accuracy is 100% from its first epoch
    on, so early stopping ends it after exactly 1 + patience epochs."""
    train, val, test = blobs(128, 0), blobs(64, 1), blobs(64, 2)
    torch.manual_seed(0)
    teacher = fit(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)), train, cross_entropy, epochs=2,
                  lr=1e-2, batch_size=16, progress=False)
    return Task("plateau", teacher, train, val, test, example_input=val.x[:1])


class Bottleneck(nn.Module):
    """An MLP with a deliberately fragile layer: ``narrow`` carries everything through 6 units, between
    two layers of 128."""

    def __init__(self) -> None:
        super().__init__()
        self.wide1, self.narrow = nn.Linear(64, 128), nn.Linear(128, 6)
        self.wide2, self.head = nn.Linear(6, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.narrow(torch.relu(self.wide1(x.flatten(1)))))
        return self.head(torch.relu(self.wide2(x)))


def fragile_bottleneck() -> Task:
    """The ``Bottleneck`` MLP trained on scikit-learn's digits for a second or two."""
    from sklearn.datasets import load_digits

    from autocomp.train import deterministic

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train, val = Split(x[:1200], y[:1200]), Split(x[1200:], y[1200:])
    torch.manual_seed(0)
    teacher = Bottleneck()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    with deterministic(threads=1):  # full batch: 300 steps of a tiny MLP
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(train.x), train.y).backward()
            optimizer.step()
    return Task("fragile_bottleneck", teacher.eval(), train, val, val, example_input=x[:1])


class DictOutput(nn.Module):
    """A model that returns a dict (as Hugging Face models do), not a tensor of logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x.flatten(1))}


def dict_output() -> Task:
    data = Split(_inputs(8, 0), torch.zeros(8, dtype=torch.long))
    return Task("dict_output", DictOutput().eval(), data, data, data, example_input=data.x[:1])


class Misbehaving(SmallCNN):
    """A model that misbehaves in training once conv1 is pruned (its evaluation, and so the teacher, is sound): it
    raises, returns NaN logits, sleeps 2 s a step, or asks for a petabyte, as ``how`` says."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not self.training or self.conv1.out_channels == 8:
            return logits
        if self.how == "raise":
            raise RuntimeError("this model cannot train pruned")
        if self.how == "sleep":
            time.sleep(2.0)
        if self.how == "memory":
            bytearray(2**50)  # MemoryError: no machine has a petabyte to give
        return logits * float("nan") if self.how == "nan" else logits


def misbehaving(how: str) -> Task:
    torch.manual_seed(0)
    data = Split(_inputs(64, 0), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0)))
    return Task(f"misbehaving_{how}", Misbehaving(how).eval(), data, data, data, example_input=data.x[:1])


def raises() -> Task:
    return misbehaving("raise")


def goes_nan() -> Task:
    return misbehaving("nan")


def sleeps() -> Task:
    return misbehaving("sleep")


def hungry() -> Task:
    return misbehaving("memory")


def digits_linear() -> Task:
    """The built-in digits task's data with a linear teacher trained in a second: an extra teacher of the same
    data (``distill.teachers``)."""
    import dataclasses

    from autocomp.tasks.digits import digits

    task = digits()
    torch.manual_seed(0)
    teacher = fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), task.train, cross_entropy, epochs=2, lr=1e-2,
                  progress=False)
    return dataclasses.replace(task, name="digits_linear", teacher=teacher.eval())
