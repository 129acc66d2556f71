"""Built-in tasks on MNIST-1D (Greydanus & Kobak, 2020), generated locally: a 1-D CNN teacher
(``mnist1d``), the paper's ~5K-parameter CNN (``mnist1d_lean``) and a transformer encoder
(``mnist1d_transformer``) on the same splits."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from autocomp.tasks.base import Task, cached_teacher, early_teacher
from autocomp.tasks.convnet import ConvNet
from autocomp.tasks.registry import TASKS
from autocomp.train import Split


class MNIST1DCNN(ConvNet):
    """Four 1-D conv layers with BatchNorm, a residual block and a two-layer head: ~0.73M parameters."""

    def __init__(self, num_classes: int = 10) -> None:  # (B, 1, 40) -> (B, 128, 20) -> (B, 256, 10)
        super().__init__(1, (64, 128, 128, 256), first_kernel=5, positions=10, hidden=192, num_classes=num_classes)


class MNIST1DLean(nn.Module):
    """The paper's small CNN (its ``ConvBase``): three strided 1-D convs of 25 channels, ReLU and a
    linear head, no BatchNorm: 5,210 parameters."""

    def __init__(self, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 1, 40)
        x = torch.relu(self.conv1(x))  # (B, 25, 19)
        x = torch.relu(self.conv2(x))  # (B, 25, 10)
        x = torch.relu(self.conv3(x))  # (B, 25, 5)
        return self.fc(x.flatten(1))  # (B, 10)


class MNIST1DTransformer(nn.Module):
    """A pre-LN transformer encoder: a strided Conv1d patch embedding (patches of 5 samples, stride 2: 20 tokens
    of ``width``), learned positions, ``layers`` ``nn.TransformerEncoderLayer`` (GELU MLP of 4 x width), a final
    LayerNorm, mean pooling over tokens and a linear head: ~0.45M parameters."""

    def __init__(self, num_classes: int = 10, width: int = 96, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, width, 5, stride=2, padding=2)
        self.position = nn.Parameter(torch.zeros(1, 20, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 1, 40)
        tokens = self.embed(x).transpose(1, 2) + self.position  # (B, 20, width)
        return self.head(self.encoder(tokens).mean(1))  # (B, 10)


TRAIN, VAL, TEST = 4000, 2000, 2000  # 2,000 held-out examples resolve a 1-point accuracy difference


@functools.cache
def mnist1d_splits() -> tuple[Split, Split, Split]:
    """MNIST-1D with the paper's generator settings and data seed, split 4000 / 2000 / 2000 (train, val, test):
    generated once per process (a few seconds), shared by the tasks on it."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # the paper's generator settings and data seed (42)
    args.num_samples, args.train_split = TRAIN + VAL + TEST, TRAIN / (TRAIN + VAL + TEST)
    data = make_dataset(args)
    x = torch.tensor(np.concatenate([data["x"], data["x_test"]]), dtype=torch.float32).unsqueeze(1)  # (N, 1, 40)
    y = torch.tensor(np.concatenate([data["y"], data["y_test"]]), dtype=torch.long)
    train, val, test = (Split(x[a:b], y[a:b]) for a, b in [(0, TRAIN), (TRAIN, TRAIN + VAL), (TRAIN + VAL, None)])
    return train, val, test


@TASKS.register("mnist1d", "MNIST-1D (8000 sequences of length 40, generated locally: 4000 train, 2000 val, "
                           "2000 test), 1-D CNN teacher, accuracy")
def mnist1d(seed: int = 0) -> Task:
    return _task("mnist1d", MNIST1DCNN, seed, epochs=15, lr=2e-3)


@TASKS.register("mnist1d_lean", "MNIST-1D (the same data and splits as mnist1d), the paper's 5K-parameter "
                                "3-conv CNN teacher, accuracy")
def mnist1d_lean(seed: int = 0) -> Task:
    return _task("mnist1d_lean", MNIST1DLean, seed, epochs=40, lr=2e-2)


@TASKS.register("mnist1d_transformer", "MNIST-1D (the same data and splits as mnist1d), a 4-layer pre-LN "
                                       "transformer encoder teacher (patch embedding, 4 heads), accuracy")
def mnist1d_transformer(seed: int = 0) -> Task:
    return _task("mnist1d_transformer", MNIST1DTransformer, seed, epochs=60, lr=1e-3, augment=shift)


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each sequence moved by up to 3 samples to either side, with wrap-around: the translations MNIST-1D's
    generator itself applies, so more of them at training time."""
    offsets = torch.randint(-3, 4, (len(x),), generator=generator)
    return torch.stack([torch.roll(row, int(o), dims=-1) for row, o in zip(x, offsets, strict=True)])


# the student families that fit MNIST-1D: 1-D CNNs (its paper's baselines: CNN 94%, MLP 68%; MLP and transformer
# students distilled here stayed below 65% in 30 epochs)
FITTING = ("cnn",)


def _task(name: str, model: type[nn.Module], seed: int, epochs: int, lr: float,
          augment: Callable[[Tensor, torch.Generator], Tensor] | None = None) -> Task:
    """A task on the MNIST-1D splits whose teacher ``model`` is trained (weight decay 0.05) and cached as ``name``."""
    train, val, test = mnist1d_splits()
    settings = dict(epochs=epochs, lr=lr, weight_decay=5e-2, seed=seed, augment=augment)
    return Task(name, cached_teacher(name, model, train, **settings), train, val, test, example_input=train.x[:1],
                students=FITTING, early_teacher=early_teacher(name, model, train, **settings))
