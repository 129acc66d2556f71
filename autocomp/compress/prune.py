"""Structured pruning that physically removes channels, on torch-pruning's dependency graph.

Each layer's channels are scored by its criterion (``criteria.py``); the lowest-scored channels
are removed together with everything that depends on them (BatchNorm entries, the next layer's
input channels). Unstructured pruning instead masks single weights to zero (``WeightMask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autocomp.compress.criteria import (
    CRITERIA,
    accumulate_gradients,
    applicable,
    preactivation_module,
    record_preactivations,
)
from autocomp.features import head_layer, layer_names
from autocomp.train import Split, seed_everything

if TYPE_CHECKING:
    from autocomp.recipe import Prune


def _tp():
    import torch_pruning

    return torch_pruning


@dataclass(frozen=True)
class PrunableLayer:
    channels: int  # output channels (Conv) or features (Linear)
    batchnorm: bool  # a BatchNorm normalises these channels

    def criteria(self, granularity: str = "channel") -> list[str]:
        """The registered criteria that can score this layer's channels (or single weights)."""
        return applicable(granularity, self.batchnorm)


def prunable_layers(model: nn.Module, example_input: Tensor) -> dict[str, PrunableLayer]:
    """Conv/Linear layers whose output channels can be removed, in model order.

    The layer that produces the model's output is excluded: its channels are the classes.
    """
    head = head_layer(model, example_input)
    modules = dict(model.named_modules())
    graph = _tp().DependencyGraph().build_dependency(model, example_inputs=example_input)
    return {n: PrunableLayer(graph.get_out_channels(modules[n]), _has_batchnorm(graph, modules[n]))
            for n in layer_names(model) if n != head}


def _has_batchnorm(graph, layer: nn.Module) -> bool:
    return preactivation_module(graph, layer) is not layer


def channels_to_remove(channels: int, sparsity: float) -> int:
    """How many of ``channels`` a sparsity removes; at least one channel always stays."""
    return min(int(round(channels * sparsity)), channels - 1)


def prune(model: nn.Module, example_input: Tensor, spec: Prune, original: dict[str, PrunableLayer],
          data: Split, seed: int = 0, progress: float = 1.0) -> nn.Module:
    """Remove channels in place until ``progress`` (0-1] of ``spec``'s removal is done.

    ``original`` holds the prunable layers of the unpruned model, against which the targets
    are counted; an iterative schedule calls this once per round with a growing ``progress``.
    """
    seed_everything(seed)
    if spec.granularity == "weight":
        return _prune_weights(model, spec, original, data, progress)
    modules = dict(model.named_modules())
    graph = _tp().DependencyGraph().build_dependency(model.eval(), example_inputs=example_input)
    channels = {name: graph.get_out_channels(modules[name]) for name in original}
    if spec.scope == "local":
        criteria = {name: layer.criterion for name, layer in spec.layers.items()
                    if layer.sparsity > 0 and name in original}  # not in original: in a dropped block
        need = {name: round(channels_to_remove(original[name].channels, spec.layers[name].sparsity) * progress)
                - (original[name].channels - channels[name]) for name in criteria}
    else:
        criteria = {name: spec.criterion for name, layer in original.items() if spec.criterion in layer.criteria()}
        need = {}
    scores = _scores(model, graph, {n: c for n, c in criteria.items() if need.get(n, 1) > 0}, data)
    if spec.scope == "global":
        total = round(spec.sparsity * sum(original[n].channels for n in criteria) * progress)
        floor = {n: max(1, math.ceil(spec.min_keep * original[n].channels)) for n in criteria}
        need = _global_counts(scores, total - sum(original[n].channels - channels[n] for n in criteria),
                              {n: channels[n] - floor[n] for n in criteria})
    for name, s in scores.items():
        prune_fn = graph.get_pruner_of_module(modules[name]).prune_out_channels
        idxs = _lowest(s, need[name], _channel_groups(graph, modules[name]))
        if idxs:
            graph.get_pruning_group(modules[name], prune_fn, idxs=idxs).prune()
    model.zero_grad(set_to_none=True)
    return model


def _scores(model: nn.Module, graph, criteria: dict[str, str], data: Split) -> dict[str, Tensor]:
    """(C,) scores of each layer's current channels, all taken before any is removed."""
    found = {name: CRITERIA.get(criterion) for name, criterion in criteria.items()}
    if any(c.needs_gradients for c in found.values()):
        accumulate_gradients(model, data)
    activations = record_preactivations(model, graph, [n for n, c in found.items() if c.needs_activations], data)
    modules, scores = dict(model.named_modules()), {}
    for name, criterion in found.items():
        layer = modules[name]
        prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_fn, idxs=list(range(graph.get_out_channels(layer))))
        scores[name] = criterion.make(activations.get(name))(group).detach().float()
    return scores


def _global_counts(scores: dict[str, Tensor], count: int, removable: dict[str, int],
                   normalise: bool = True) -> dict[str, int]:
    """How many channels (weights) each layer gives when the ``count`` lowest go across layers,
    scores divided by their layer's mean if ``normalise``; no layer gives more than ``removable``.

    A layer that would give more than its share is capped, and the rest is ranked again without it.
    """
    flat = {n: s.flatten() / (s.mean().clamp_min(1e-12) if normalise else 1.0) for n, s in scores.items()}
    counts, open_layers = dict.fromkeys(scores, 0), list(scores)
    while count > 0 and open_layers:
        values = torch.cat([flat[n] for n in open_layers])
        owner = torch.cat([torch.full((len(flat[n]),), i) for i, n in enumerate(open_layers)])
        taken = torch.bincount(owner[values.argsort(stable=True)[:count]], minlength=len(open_layers))
        capped = [n for i, n in enumerate(open_layers) if taken[i] >= removable[n]]
        if not capped:
            counts.update({n: int(taken[i]) for i, n in enumerate(open_layers)})
            break
        for n in capped:
            counts[n] = max(removable[n], 0)
            count -= counts[n]
            open_layers.remove(n)
    return counts


def _channel_groups(graph, layer: nn.Module) -> int:
    """The number of groups of a grouped (not depthwise) convolution coupled to ``layer``'s channels:
    such a convolution stays valid only if every group loses as many channels."""
    prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
    convs = [dep.target.module for dep, _ in graph.get_pruning_group(layer, prune_fn, idxs=[0])
             if isinstance(dep.target.module, nn.modules.conv._ConvNd)]
    return max([c.groups for c in convs if 1 < c.groups < c.in_channels], default=1)


def _lowest(scores: Tensor, count: int, groups: int) -> list[int]:
    """The ``count`` lowest-scored channels, as many from each of ``groups`` equal blocks."""
    if count <= 0:
        return []
    if groups == 1:
        return scores.argsort(stable=True)[:count].tolist()
    per_group = count // groups
    blocks = scores.view(groups, -1)  # (G, C / G)
    offsets = torch.arange(groups).unsqueeze(1) * blocks.shape[1]
    return sorted((blocks.argsort(dim=1, stable=True)[:, :per_group] + offsets).flatten().tolist())


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask`` of unstructured pruning: a pruned weight reads as exactly
    zero and gets no gradient. It is the first parametrization of the weight, so one registered after it (the
    fake quantizer of ``qat.py``) sees the masked weight."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def weight_mask(layer: nn.Module) -> Tensor | None:
    """The 0/1 mask on ``layer``'s weight (same shape), None if its weights are not masked."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    first = layer.parametrizations.weight[0]
    return first.mask if isinstance(first, WeightMask) else None


def latent_weight(layer: nn.Module) -> Tensor:
    """The weight the optimizer trains: under parametrizations (mask, fake quantizer) their original."""
    return layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight


def _prune_weights(model: nn.Module, spec: Prune, original: dict[str, PrunableLayer], data: Split,
                   progress: float) -> nn.Module:
    """Unstructured pruning: mask the lowest-scored single weights to zero (a ``WeightMask``).

    The masks stay on through the fine-tune, so pruned weights remain zero; ``finalize_masks``
    makes them permanent. A weight already masked counts first towards the target.
    """
    modules = dict(model.named_modules())
    plan = ({n: (layer.sparsity, layer.criterion) for n, layer in spec.layers.items()
             if layer.sparsity > 0 and n in original}
            if spec.scope == "local" else {n: (spec.sparsity, spec.criterion) for n in original})
    found = {n: CRITERIA.get(criterion) for n, (_, criterion) in plan.items()}
    if any(c.needs_gradients for c in found.values()):
        accumulate_gradients(model, data)
    scores = {}
    for name, criterion in found.items():
        layer = modules[name]
        score = criterion.weight_score(layer.weight.detach(), latent_weight(layer).grad).detach().float()
        mask = weight_mask(layer)
        scores[name] = score if mask is None else score.masked_fill(mask == 0, float("-inf"))
    sizes = {name: s.numel() for name, s in scores.items()}
    if spec.scope == "local":
        counts = {name: min(round(plan[name][0] * sizes[name] * progress), sizes[name] - 1) for name in scores}
    else:
        floor = {name: max(1, math.ceil(spec.min_keep * n)) for name, n in sizes.items()}
        counts = _global_counts(scores, round(spec.sparsity * sum(sizes.values()) * progress),
                                {name: n - floor[name] for name, n in sizes.items()}, normalise=False)
    for name, score in scores.items():
        mask = torch.ones(score.numel())
        mask[score.flatten().argsort(stable=True)[: counts[name]]] = 0.0
        _set_mask(modules[name], mask.view_as(score))
    model.zero_grad(set_to_none=True)
    return model


def _set_mask(layer: nn.Module, mask: Tensor) -> None:
    current = weight_mask(layer)
    if current is None:
        parametrize.register_parametrization(layer, "weight", WeightMask(mask))
    else:
        current.copy_(mask)


def regrow(model: nn.Module, fraction: float, generator: torch.Generator) -> None:
    """Sparse training step (SET): in each masked layer drop ``fraction`` of the kept weights with the
    lowest magnitude and regrow as many pruned positions at random, starting from zero."""
    for layer in model.modules():
        mask = weight_mask(layer)
        if mask is None:
            continue
        flat_mask, weights = mask.view(-1), latent_weight(layer).data.view(-1)
        kept, pruned = flat_mask.nonzero().squeeze(1), (flat_mask == 0).nonzero().squeeze(1)
        k = min(round(fraction * len(kept)), len(pruned))
        if k == 0:
            continue
        drop = kept[weights[kept].abs().argsort(stable=True)[:k]]
        grow = pruned[torch.randperm(len(pruned), generator=generator)[:k]]
        flat_mask[drop], flat_mask[grow], weights[grow] = 0.0, 1.0, 0.0


def finalize_masks(model: nn.Module) -> nn.Module:
    """Make unstructured masks permanent: each masked weight becomes a plain parameter with zeros."""
    for layer in [m for m in model.modules() if weight_mask(m) is not None]:  # listed first: removal edits the tree
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model
