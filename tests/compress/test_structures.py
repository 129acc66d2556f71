"""Dependency-aware structured pruning across residual adds, concatenation, depthwise and grouped
convolutions and Linear chains: the model keeps running and every coupled layer shrinks together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocomp.compress.criteria import CRITERIA
from autocomp.compress.prune import prunable_layers
from autocomp.train import Split
from tests.conftest import prune_local

X = torch.zeros(1, 3, 8, 8)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.res = nn.Conv2d(16, 16, 3, padding=1)  # residual: out + stem
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)  # grouped
        self.side = nn.Conv2d(16, 8, 1)  # concatenated with grouped
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8)
        s = torch.relu(self.bn(self.stem(x)))
        s = torch.relu(self.res(s)) + s
        s = torch.relu(self.dw(s))
        s = torch.cat([self.grouped(s), self.side(s)], dim=1)  # (B, 16, 8, 8)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(s.mean((2, 3)))))))


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_coupled_layers_shrink_together_and_the_model_still_runs(criterion):
    torch.manual_seed(0)
    model = Branchy().eval()
    layers = prunable_layers(model, X)
    assert "head" not in layers and {"stem", "res", "dw", "grouped", "side", "fc1", "fc2"} <= set(layers)
    data = Split(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    plan = {name: (0.5, criterion if criterion in layers[name].criteria() else "l1")
            for name in ("stem", "side", "fc1", "fc2")}
    prune_local(model, plan, data, example_input=X)
    assert model.stem.out_channels == model.res.out_channels == model.dw.out_channels == 8  # residual-coupled
    assert model.dw.groups == 8 and model.grouped.in_channels == 8
    assert model.side.out_channels == 4 and model.fc1.in_features == model.grouped.out_channels + 4  # concat
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features, model.head.in_features) == (
        16, 16, 12, 12)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
