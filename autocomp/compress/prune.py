"""Structured pruning that physically removes channels, on torch-pruning's dependency graph.

Channels go per pruning group (``groups.py``: the layers whose channels are tied, as by a residual add):
each group's channels are scored by its criterion (``criteria.py``) and the lowest-scored ones are removed
from every member together with everything that depends on them (BatchNorm entries, the next layers' input
channels). Unstructured pruning instead masks single weights of each layer to zero (``WeightMask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autocomp.compress.criteria import CRITERIA, accumulate_gradients, applicable, record_preactivations
from autocomp.compress.groups import balanced, check_metadata, dependency_graph, dependency_group, probe, pruning_groups
from autocomp.features import layer_names
from autocomp.train import Split, seed_everything

if TYPE_CHECKING:
    from autocomp.recipe import Prune


@dataclass(frozen=True)
class PrunableLayer:
    channels: int  # output channels (Conv) or features (Linear), as every layer of its group
    batchnorm: bool  # a BatchNorm normalises these channels
    group: str  # the name of its pruning group (``groups.py``): the group's first member
    divisor: int = 1  # its group loses channels in multiples of this, the same positions in each block

    def criteria(self, granularity: str = "channel") -> list[str]:
        """The registered criteria that can score this layer's channels (or single weights)."""
        return applicable(granularity, self.batchnorm)


def prunable_layers(model: nn.Module, example_input: Tensor, left_out: list[str] | None = None
                    ) -> dict[str, PrunableLayer]:
    """The members of the model's pruning groups, in model order, each with its group's channels and name.

    The group of the layer that produces the model's output is excluded: its channels are the classes. So is a
    group whose channels the model's forward cannot lose (``groups.probe``); ``left_out`` gets one line for each.
    """
    groups = pruning_groups(model, example_input)
    divisors = probe(model, example_input, groups)
    for g in groups:
        if divisors[g.name] is None and left_out is not None:
            left_out.append(f"group {g.name!r} ({', '.join(g.members)}) is not pruned: the model's forward fails "
                            f"or changes its output shape once any of its {g.channels} channels go")
    layers = {member: PrunableLayer(g.channels, g.batchnorm, g.name, divisors[g.name])
              for g in groups if divisors[g.name] is not None for member in g.members}
    return {name: layers[name] for name in layer_names(model) if name in layers}


def channels_to_remove(channels: int, sparsity: float, divisor: int = 1) -> int:
    """How many of ``channels`` a sparsity removes: the nearest multiple of ``divisor`` (a grouped convolution
    loses as many channels in each of its groups); at least ``divisor`` channels always stay."""
    blocks = channels // divisor
    return divisor * min(int(round(blocks * sparsity)), blocks - 1)


def prune(model: nn.Module, example_input: Tensor, spec: Prune, original: dict[str, PrunableLayer],
          data: Split, seed: int = 0, progress: float = 1.0) -> nn.Module:
    """Remove channels in place until ``progress`` (0-1] of ``spec``'s removal is done.

    ``original`` holds the prunable layers of the unpruned model, against which the targets are counted
    (each group's share of its original channels); an iterative schedule calls this once per round with a
    growing ``progress``. Channels go per pruning group: one target, one ranking, one removal per group.
    Layers of ``original`` the model no longer has (dropped blocks) are skipped, but an entry naming one
    still prunes the rest of its group.
    """
    seed_everything(seed)
    if spec.granularity == "weight":
        return _prune_weights(model, spec, original, data, progress)
    graph = dependency_graph(model, example_input)
    groups = {g.name: g for g in pruning_groups(model, example_input, graph) if g.name in original}
    size = {name: original[name].channels for name in groups}  # against which targets count
    removed = {name: size[name] - g.channels for name, g in groups.items()}  # by earlier rounds
    divisor = {name: math.lcm(g.divisor, original[name].divisor) for name, g in groups.items()}
    if spec.scope == "local":
        # a group's entry names any one member; after dropped blocks a group may have a new first member
        targets = {original[n].group: entry for n, entry in spec.layers.items() if n in original and entry.sparsity > 0}
        plan = {name: targets[original[name].group] for name in groups if original[name].group in targets}
        criteria = {name: entry.criterion for name, entry in plan.items()}
        need = {name: channels_to_remove(size[name], entry.sparsity * progress, divisor[name]) - removed[name]
                for name, entry in plan.items()}
    else:
        criteria = {name: spec.criterion for name, g in groups.items() if spec.criterion in g.criteria()}
        need = {}
    scores = _scores(model, graph, {n: c for n, c in criteria.items() if need.get(n, 1) > 0}, data)
    if spec.scope == "global":
        total = round(spec.sparsity * sum(size[n] for n in criteria) * progress)
        floor = {n: max(1, math.ceil(spec.min_keep * size[n])) for n in criteria}
        need = _global_counts(scores, total - sum(removed[n] for n in criteria),
                              {n: groups[n].channels - floor[n] for n in criteria})
    modules = dict(model.named_modules())
    for name, s in scores.items():
        idxs = _lowest(s, need[name], divisor[name])
        if idxs:
            dependency_group(graph, modules[name], idxs).prune()
    model.zero_grad(set_to_none=True)
    check_metadata(model)
    return model


def _scores(model: nn.Module, graph, criteria: dict[str, str], data: Split) -> dict[str, Tensor]:
    """(C,) scores of each group's current channels (the group rooted at the named layer), all taken before any
    channel is removed."""
    found = {name: CRITERIA.get(criterion) for name, criterion in criteria.items()}
    if any(c.needs_gradients for c in found.values()):
        accumulate_gradients(model, data)
    activations = record_preactivations(model, graph, [n for n, c in found.items() if c.needs_activations], data)
    modules = dict(model.named_modules())
    return {name: criterion.make(activations.get(name))(dependency_group(graph, modules[name])).detach().float()
            for name, criterion in found.items()}


def _global_counts(scores: dict[str, Tensor], count: int, removable: dict[str, int],
                   normalise: bool = True) -> dict[str, int]:
    """How many channels (weights) each group (layer) gives when the ``count`` lowest go across them, scores
    divided by their group's mean if ``normalise``; none gives more than its ``removable``.

    One that would give more than its share is capped, and the rest is ranked again without it.
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


def _lowest(scores: Tensor, count: int, divisor: int) -> list[int]:
    """The ``count`` lowest-scored channels, rounded down to a multiple of ``divisor``: with ``divisor`` > 1 the
    same positions in each of ``divisor`` equal blocks, the lowest by their summed scores (a grouped convolution
    reading these channels keeps one slice of its weight for every group)."""
    per_block = count // divisor
    if per_block <= 0:
        return []
    positions = scores.view(divisor, len(scores) // divisor).sum(0).argsort(stable=True)[:per_block]
    return balanced(len(scores), divisor, positions.tolist())


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
    present = [n for n in original if n in modules]  # not the layers of dropped blocks
    plan = ({n: (layer.sparsity, layer.criterion) for n, layer in spec.layers.items()
             if layer.sparsity > 0 and n in present}
            if spec.scope == "local" else {n: (spec.sparsity, spec.criterion) for n in present})
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


def rewind(model: nn.Module, early: dict[str, Tensor]) -> nn.Module:
    """Lottery-ticket weight rewinding (Frankle et al., ICML 2020; Renda et al., ICLR 2020): every parameter and buffer
    of ``model`` takes its value in ``early``, a state of the same network early in its training (names as its
    ``state_dict`` gives them), and the masks stay: a masked layer's latent weight takes the early values, so its
    kept weights are the early ones and its pruned ones read zero. A parameter or buffer ``early`` lacks (a state of
    another network) and a shape that differs (channels pruned away) are refused: rewinding keeps the network."""
    latent = {f"{name}.weight": m.parametrizations.weight.original for name, m in model.named_modules()
              if parametrize.is_parametrized(m, "weight")}
    current = {**dict(model.named_parameters()), **dict(model.named_buffers()), **latent}
    missing = [name for name in current if name not in early and ".parametrizations." not in name]
    if missing:
        raise ValueError(f"cannot rewind {missing[0]}: the early state has no such entry ({len(missing)} of "
                         f"{len(current)} missing; rewinding needs the same network's state dict)")
    with torch.no_grad():
        for name, value in current.items():
            if name not in early:
                continue
            if early[name].shape != value.shape:
                raise ValueError(f"cannot rewind {name}: its shape is {tuple(value.shape)} now, "
                                 f"{tuple(early[name].shape)} early in training (rewinding keeps the shape)")
            value.copy_(early[name])
    return model
