"""Built-in task: scikit-learn's 8x8 handwritten digits and a BatchNorm CNN teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autocomp.tasks.base import Task, cached_teacher, early_teacher
from autocomp.tasks.convnet import ConvNet
from autocomp.tasks.registry import TASKS
from autocomp.train import Split


class DigitsCNN(ConvNet):
    """Four 3x3 conv layers with BatchNorm, a residual block and a two-layer head: ~0.8M parameters."""

    def __init__(self, num_classes: int = 10) -> None:  # (B, 1, 8, 8) -> (B, 64, 4, 4) -> (B, 256, 2, 2)
        super().__init__(2, (32, 64, 128, 256), first_kernel=3, positions=2 * 2, hidden=256, num_classes=num_classes)


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Augmentation: translate each image by up to one pixel (zero fill)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))  # (B, C, H+2, W+2)
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + h, dx : dx + w]


@TASKS.register("digits", "scikit-learn 8x8 digits (1797 images), 4-conv BatchNorm CNN teacher, accuracy")
def digits(seed: int = 0) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    # fixed 60/20/20 stratified split, independent of the study seed
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=0)
    train_split = Split(x[train], y[train])
    settings = dict(epochs=30, lr=2e-3, weight_decay=1e-4, seed=seed, augment=shift)
    teacher = cached_teacher("digits", DigitsCNN, train_split, **settings)
    return Task("digits", teacher, train_split, Split(x[val], y[val]), Split(x[test], y[test]),
                example_input=x[:1], students=("cnn", "mlp"),  # 8x8 images: convolutions, or 64 inputs flat
                early_teacher=early_teacher("digits", DigitsCNN, train_split, **settings))
