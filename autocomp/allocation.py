"""Per-layer choices from a few knobs and the teacher's sensitivity map (a space's ``policy``).

A sampler learns a handful of dimensions in tens of trials, not one per layer. So a space with a ``policy``
searches two knobs and derives every layer's choice from the sensitivity map (``autocomp.sensitivity``), as
NVIDIA Model Optimizer's FastNAS derives every layer's width from one threshold:

- ``follow``: how strongly each pruning group's sparsity follows what pruning it costs. A group's cost is the
  accuracy pruning it alone loses at the level, per parameter tied to its channels (a large group that costs
  little is the best place to remove parameters). With ``z`` its log cost standardised over the groups, its
  sparsity is the level times ``exp(-follow * z)``, scaled so that the parameter-weighted mean sparsity stays
  the level (capped at the space's highest sparsity): at 0 every group gets the level, the uniform recipe.
- ``protect``: accuracy points. A layer whose quantization alone at the trial's width costs more keeps a wider
  format: in static int8 trials it stays fp32 (its weights 8-bit), with low-bit weights it takes the narrowest
  measured width (4, then 8 bits) that costs at most ``protect``, else fp32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import Tensor, nn

from autocomp.compress.prune import PrunableLayer, prune
from autocomp.recipe import LayerPrune, Prune
from autocomp.sensitivity import Sensitivity
from autocomp.train import Split

FLOOR = 1e-3  # the least accuracy drop a group is given (0.1 points): no group is free
Z_MAX = 2.0  # standardised log costs are clipped to +-Z_MAX: at ``follow`` 1 shares stay within e^-2..e^2


@dataclass(frozen=True)
class Guide:
    """What a policy reads of the teacher: its sensitivity map and the parameters tied to each pruning group's
    channels (``tied_parameters``)."""

    sensitivity: Sensitivity
    sizes: dict[str, int]


def tied_parameters(model: nn.Module, example_input: Tensor, prunable: dict[str, PrunableLayer], data: Split
                    ) -> dict[str, int]:
    """The parameters that leave with each pruning group's channels, its members' and its consumers' input
    slices (a convolution feeding a flattened Linear takes much of it along): counted by pruning half of each
    group's channels alone and scaling what went."""
    total = sum(p.numel() for p in model.parameters())
    sizes = {}
    for group in dict.fromkeys(layer.group for layer in prunable.values()):
        pruned = copy.deepcopy(model)
        prune(pruned, example_input, Prune(layers={group: LayerPrune(0.5, "l1")}), prunable, data)
        removed = prunable[group].channels - next(m for n, m in pruned.named_modules() if n == group).weight.shape[0]
        sizes[group] = round((total - sum(p.numel() for p in pruned.parameters())) * prunable[group].channels
                             / max(removed, 1))
    return sizes


def group_sparsities(guide: Guide, groups: list[str], level: float, follow: float, cap: float) -> dict[str, float]:
    """Each group's sparsity at ``level`` (module docstring), at most ``cap``."""
    if level <= 0 or not groups:
        return dict.fromkeys(groups, 0.0)
    sizes = {g: max(guide.sizes.get(g, 1), 1) for g in groups}
    cost = {g: math.log((max(guide.sensitivity.prune_drop(g, level), 0.0) + FLOOR) / sizes[g])
            for g in groups if g in guide.sensitivity.prune}
    mean = sum(cost.values()) / max(len(cost), 1)
    spread = math.sqrt(sum((c - mean) ** 2 for c in cost.values()) / max(len(cost), 1)) or 1.0
    z = {g: min(max((cost[g] - mean) / spread, -Z_MAX), Z_MAX) if g in cost else 0.0 for g in groups}
    share = {g: math.exp(-follow * z[g]) for g in groups}
    total, wanted = sum(sizes.values()), level * sum(sizes.values())
    if wanted >= cap * total:
        return dict.fromkeys(groups, round(cap, 6))

    def removed(scale: float) -> float:
        return sum(sizes[g] * min(scale * level * share[g], cap) for g in groups)

    low, high = 0.0, 1.0
    while removed(high) < wanted:
        high *= 2
    for _ in range(50):  # bisection: removed() grows with the scale
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < wanted else (low, middle)
    return {g: round(min(high * level * share[g], cap), 6) for g in groups}


def layer_formats(guide: Guide, layers: list[str], bits: int, static_int8: bool, protect: float
                  ) -> tuple[dict[str, int], dict[str, int]]:
    """Each layer's weight bits and activation bits where ``protect`` (points) widens it (module docstring):
    ``(layers, activation_layers)`` of a ``Quantize``, naming only the layers that differ from the trial's."""
    limit = protect / 100.0
    measured = guide.sensitivity.quantize
    weights: dict[str, int] = {}
    activations: dict[str, int] = {}
    for layer in layers:
        if layer not in measured:
            continue
        if static_int8:
            if guide.sensitivity.quantize_drop(layer, 8) > limit:
                activations[layer] = 32
            continue
        if bits > 8 or str(bits) not in measured[layer] or guide.sensitivity.quantize_drop(layer, bits) <= limit:
            continue
        wider = [b for b in (4, 8) if b > bits and str(b) in measured[layer]]
        weights[layer] = next((b for b in wider if guide.sensitivity.quantize_drop(layer, b) <= limit), 32)
    return weights, activations
