from __future__ import annotations

import pytest
import torch
from torch import nn

from autocomp.compress.blocks import Residual, block_scores, drop_blocks, residual_blocks
from autocomp.errors import ConfigError
from autocomp.recipe import Prune, Recipe


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
    assert list(scores) == ["blocks.0", "blocks.1", "blocks.2"] == residual_blocks(model)
    assert scores["blocks.1"] == 0.0 and min(scores["blocks.0"], scores["blocks.2"]) > 0.01
    before = model(x)
    assert drop_blocks(model, 1, x) == ["blocks.1"]
    assert isinstance(model.blocks[1], nn.Identity) and residual_blocks(model) == ["blocks.0", "blocks.2"]
    torch.testing.assert_close(model(x), before)  # dropping a block that adds nothing changes nothing


def test_dropping_more_blocks_than_the_model_has_is_rejected():
    recipe = Recipe(task="t", prune=Prune(drop_blocks=2))
    with pytest.raises(ConfigError, match="at most the 1 residual blocks") as err:
        recipe.check_layers({}, [], ["block"])
    assert err.value.field == "recipe.prune.drop_blocks"
