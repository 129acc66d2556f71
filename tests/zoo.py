"""A zoo of the model shapes users bring, as user tasks (``task: "tests.zoo:NAME"``).

Small teachers, each trained in a few seconds (full batch, deterministic; cached as the built-in teachers are) on
data that ships with scikit-learn: the digits images (8x8, or their rows as 8 tokens of 8 features, or their 64
pixels as one 1-D signal) and the breast cancer table (30 features, 2 classes).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from autocomp.tasks import Task
from autocomp.tasks.base import cached_model, digest
from autocomp.train import Split, deterministic


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convolutions, a projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    """MobileNet's block: a depthwise 3x3 and a pointwise 1x1 convolution, each with BatchNorm and ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                       nn.BatchNorm2d(cin), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1 (linear), added to its input."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.features = nn.Sequential(DepthwiseSeparable(8, 16), DepthwiseSeparable(16, 24, stride=2),
                                      InvertedResidual(24))
        self.classifier = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.stem(x)).mean((2, 3)))


class Inception(nn.Module):
    """GoogLeNet's module: 1x1, 1x1 -> 3x3 and pool -> 1x1 branches concatenated, then a 3x3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.branch1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.branch3 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 6, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(26, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], dim=1)
        return self.fc(torch.flatten(self.mix(x), 1))


class Conv1dFlatten(nn.Module):
    """Conv1d -> Flatten -> Linear on the 64 pixels as one signal."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                                      nn.Conv1d(16, 24, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2))
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(nn.Linear(24 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.features(x)))


class Encoder(nn.Module):
    """A ViT-style encoder over the image's 8 rows as tokens, from ``nn.TransformerEncoderLayer``:
    pre-LN (``norm_first``) or post-LN, GELU, mean pooling."""

    def __init__(self, norm_first: bool, width: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(1, 8, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 8, 8), rows as tokens
        return self.head(self.encoder(self.embed(x) + self.position).mean(1))


class Attention(nn.Module):
    """Hand-written multi-head self-attention from Linear layers (q, k, v, out), as timm and many users write it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class LinearTransformer(nn.Module):
    """Pre-LN blocks of the hand-written ``Attention`` and a GELU MLP, residual adds around both."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class TabularMLP(nn.Module):
    """An MLP for tabular data: Linear -> LayerNorm -> GELU, twice, then a 2-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 64), nn.LayerNorm(64), nn.GELU(),
                                 nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@functools.cache
def _digits(layout: str) -> tuple[Split, Split, Split]:
    """scikit-learn's digits, 500 / 400 / 397, as images (1, 8, 8), ``rows`` (8, 8) or a ``signal`` (1, 64)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x = {"image": x.reshape(-1, 1, 8, 8), "rows": x.reshape(-1, 8, 8), "signal": x.reshape(-1, 1, 64)}[layout]
    y = torch.tensor(y)
    return Split(x[:500], y[:500]), Split(x[1000:1400], y[1000:1400]), Split(x[1400:], y[1400:])


@functools.cache
def _breast_cancer() -> tuple[Split, Split, Split]:
    """scikit-learn's breast cancer table, standardised on the training rows, 300 / 130 / 139."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    x = (x - x[:300].mean(0)) / x[:300].std(0)
    return Split(x[:300], y[:300]), Split(x[300:430], y[300:430]), Split(x[430:], y[430:])


def _fit(model: nn.Module, train: Split, steps: int, lr: float) -> None:
    """Full batch Adam for ``steps`` steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with deterministic(threads=1):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(train.x), train.y).backward()
            optimizer.step()


def _train(name: str, model: nn.Module, splits: tuple[Split, Split, Split], steps: int, lr: float = 3e-3) -> Task:
    """``model`` trained by ``_fit`` as the task ``name``, its weights cached as a teacher's are (kept between test
    runs: tests/conftest.py)."""
    train, val, test = splits
    trains = f"{steps}|{lr}|{digest([train.x, train.y])}|{inspect.getsource(_fit)}"
    model = cached_model(f"zoo-{name}", model, trains, lambda m: _fit(m, train, steps, lr))
    return Task(name, model, train, val, test, example_input=train.x[:1])


def _built(name: str, build, layout: str, steps: int) -> Task:
    torch.manual_seed(0)
    splits = _breast_cancer() if layout == "table" else _digits(layout)
    return _train(name, build(), splits, steps)


@functools.cache
def resnet() -> Task:
    return _built("resnet", ResNet, "image", 120)


@functools.cache
def mobilenet() -> Task:
    return _built("mobilenet", MobileNet, "image", 150)


@functools.cache
def inception() -> Task:
    return _built("inception", Inception, "image", 120)


@functools.cache
def conv1d_flatten() -> Task:
    return _built("conv1d_flatten", Conv1dFlatten, "signal", 120)


@functools.cache
def pre_ln_transformer() -> Task:
    return _built("pre_ln_transformer", lambda: Encoder(norm_first=True), "rows", 200)


@functools.cache
def post_ln_transformer() -> Task:
    return _built("post_ln_transformer", lambda: Encoder(norm_first=False), "rows", 200)


@functools.cache
def linear_transformer() -> Task:
    return _built("linear_transformer", LinearTransformer, "rows", 200)


@functools.cache
def tabular_mlp() -> Task:
    return _built("tabular_mlp", TabularMLP, "table", 150)


ZOO = ("resnet", "mobilenet", "inception", "conv1d_flatten", "pre_ln_transformer", "post_ln_transformer",
       "linear_transformer", "tabular_mlp")
