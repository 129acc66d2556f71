from __future__ import annotations

import pytest
import torch
from torch import nn

from autocomp.compress.blocks import Residual, block_scores, drop_blocks, residual_blocks
from autocomp.compress.facts import model_facts
from autocomp.errors import ConfigError
from autocomp.narrowing import narrow
from autocomp.recipe import Prune, Recipe
from autocomp.space import SearchSpace
from tests.conftest import ROOT


def body() -> nn.Module:
    return nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Residual(body()), Residual(body()), Residual(body()))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 16)
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(2))


def test_a_block_that_adds_nothing_scores_zero_and_is_dropped_first():
    torch.manual_seed(0)
    model = Tower().eval()
    with torch.no_grad():
        model.blocks[1].body[1].weight.zero_()
        model.blocks[1].body[1].bias.fill_(-1.0)  # BN output -1 -> ReLU 0: the branch adds nothing
    x = torch.randn(32, 1, 16)
    scores = block_scores(model, x)
    assert list(scores) == ["blocks.0", "blocks.1", "blocks.2"] == residual_blocks(model, x)
    assert scores["blocks.1"] == 0.0 and min(scores["blocks.0"], scores["blocks.2"]) > 0.01
    before = model(x)
    assert drop_blocks(model, 1, x) == ["blocks.1"]
    assert isinstance(model.blocks[1], nn.Identity) and residual_blocks(model, x) == ["blocks.0", "blocks.2"]
    torch.testing.assert_close(model(x), before)  # dropping a block that adds nothing changes nothing


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, channels: int, projection: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)) \
            if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8), BasicBlock(8))
        self.layer2 = BasicBlock(8, projection=True)  # same shape, so only its traced shortcut tells it apart
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8)
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def test_basic_blocks_with_identity_shortcuts_are_found_and_dropped():
    torch.manual_seed(0)
    model = ResNet().eval()
    with torch.no_grad():  # bn2 outputs 0, so the block is relu(0 + x) = x on its input x >= 0 (after a ReLU)
        model.layer1[1].bn2.weight.zero_()
        model.layer1[1].bn2.bias.zero_()
    x = torch.randn(16, 1, 8, 8)
    assert residual_blocks(model, x) == ["layer1.0", "layer1.1", "layer1.2"]  # not the projection block layer2
    scores = block_scores(model, x)
    assert scores["layer1.1"] == 0.0 and min(scores["layer1.0"], scores["layer1.2"]) > 0.01
    before = model(x)
    assert drop_blocks(model, 1, x) == ["layer1.1"] and isinstance(model.layer1[1], nn.Identity)
    torch.testing.assert_close(model(x), before)


class Gated(nn.Module):
    """Adds its branch only when the input sums positive: control flow on data, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.body = body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if x.sum() > 0 else x


def test_untraceable_and_shape_changing_modules_are_not_blocks():
    model = nn.Sequential(Residual(nn.Conv1d(1, 8, 3, padding=1)), Gated(), Residual(body()))  # 1st: (B, 1) -> (B, 8)
    x = torch.randn(4, 1, 16)
    assert residual_blocks(model, x) == ["2"] and drop_blocks(model, 1, x) == ["2"]


def test_a_block_inside_a_block_is_not_listed():
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), Residual(nn.Sequential(Residual(body()), Residual(body()))))
    assert residual_blocks(model, torch.randn(4, 1, 16)) == ["1"]  # dropping "1" drops both inner blocks


def test_dropping_more_blocks_than_the_model_has_is_rejected():
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), Residual(body()))
    facts = model_facts(model, torch.randn(1, 1, 16))
    assert facts.blocks == ["1"]
    with pytest.raises(ConfigError, match=r"at most the 1 residual blocks .* but got 2") as err:
        facts.check(Recipe(task="t", prune=Prune(drop_blocks=2)))
    assert err.value.field == "recipe.prune.drop_blocks"


def test_a_space_is_narrowed_to_the_blocks_a_model_has():
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")  # drop_blocks: [0, 1]
    assert narrow(space, "drop_blocks", 1, "has 1 residual block(s)", "t") is None
    assert narrow(space, "drop_blocks", 0, "has 0 residual block(s)", "t") == (
        "space.prune.drop_blocks narrowed from [0, 1] to [0]: the 't' model has 0 residual block(s)")
    assert space.pruning["drop_blocks"].fixed
    fixed = SearchSpace.from_dict({"schema_version": 1, "prune": {"drop_blocks": 2}})  # written: nothing to narrow to
    with pytest.raises(ConfigError, match="must allow at most 1 for the 't' model, which has 1 residual block") as err:
        narrow(fixed, "drop_blocks", 1, "has 1 residual block(s)", "t")
    assert err.value.field == "space.prune.drop_blocks"
