"""Block dropping: remove whole residual blocks, the ones whose branch adds least to their input.

A residual block computes x + f(x); dropped, it computes x (Veit et al., NeurIPS 2016: residual
networks degrade gracefully when single blocks are removed). Blocks are the ``Residual`` modules
of a model; a block's score is the mean of ||f(x)|| / ||x|| over training inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autocomp.features import Tap


class Residual(nn.Module):
    """x + body(x): a block that block dropping may remove whole (it then passes x through)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the model's ``Residual`` blocks, in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, Residual)]


@torch.no_grad()
def block_scores(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Each block's relative contribution ||f(x)|| / ||x||, averaged over the samples of ``x``."""
    names = residual_blocks(model)
    bodies = [f"{name}.body" for name in names]
    with Tap(model, bodies) as outputs, Tap(model, names, inputs=True) as inputs:
        model.eval()(x)
        return {name: float((outputs.values[body].flatten(1).norm(dim=1)
                             / inputs.values[name].flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
                for name, body in zip(names, bodies, strict=True)}


def drop_blocks(model: nn.Module, count: int, x: Tensor) -> list[str]:
    """Replace the ``count`` lowest-scored blocks with identities; return their names."""
    scores = block_scores(model, x)
    dropped = sorted(scores, key=scores.__getitem__)[:count]
    for name in dropped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return dropped
