"""The built-in tasks' CNN teacher, 1-D or 2-D: four convolutions with BatchNorm, a residual block after the third,
2x max pooling after the second and the fourth, and a two-layer head with dropout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autocomp.compress.blocks import Residual


class ConvNet(nn.Module):
    """``widths`` of the four convolutions, the first two of kernel ``first_kernel``, the rest 3; ``positions`` left
    after both poolings (per spatial dimension product); a hidden Linear of ``hidden`` units before the head."""

    def __init__(self, dims: int, widths: tuple[int, int, int, int], first_kernel: int, positions: int, hidden: int,
                 num_classes: int) -> None:
        super().__init__()
        conv, norm, pool = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if dims == 1 else (
            nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
        c1, c2, c3, c4 = widths
        k = first_kernel
        self.conv1, self.bn1 = conv(1, c1, k, padding=k // 2), norm(c1)
        self.conv2, self.bn2 = conv(c1, c2, k, padding=k // 2), norm(c2)
        self.conv3, self.bn3 = conv(c2, c3, 3, padding=1), norm(c3)
        self.block = Residual(nn.Sequential(conv(c3, c3, 3, padding=1), norm(c3), nn.ReLU()))
        self.conv4, self.bn4 = conv(c3, c4, 3, padding=1), norm(c4)
        self.fc1 = nn.Linear(c4 * positions, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool, self.drop = pool(2), nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.block(torch.relu(self.bn3(self.conv3(x))))
        x = self.pool(torch.relu(self.bn4(self.conv4(x))))
        x = self.drop(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)
