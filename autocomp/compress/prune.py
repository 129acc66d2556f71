"""Structured pruning that physically removes channels, on torch-pruning's dependency graph.

A criterion is a torch-pruning ``Importance``: ``importance(group) -> Tensor`` with one score
per output channel of the group's root layer; the lowest-scored channels are removed, together
with everything that depends on them (BatchNorm entries, the next layer's input channels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autocomp.features import head_layer, layer_names
from autocomp.registry import Registry
from autocomp.train import Split, seed_everything


@dataclass(frozen=True)
class Criterion:
    """How to score channels: a torch-pruning Importance factory, and whether it reads gradients."""

    make: Callable[[], object]
    needs_gradients: bool = False
    needs_batchnorm: bool = False  # scores come from the BatchNorm that follows the layer


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def _tp():
    import torch_pruning

    return torch_pruning


def _importance(name: str, **kwargs) -> Callable[[], object]:
    """A factory of ``torch_pruning.importance.<name>(**kwargs)``, imported on first use."""
    return lambda: getattr(_tp().importance, name)(**kwargs)


# "first": a channel is scored by its root layer's own weights, as the papers define it.
_FIRST = {"group_reduction": "first", "normalizer": None}
CRITERIA.add("l1", Criterion(_importance("MagnitudeImportance", p=1, **_FIRST)),
             "L1 norm of each filter (Li et al., ICLR 2017)")
CRITERIA.add("l2", Criterion(_importance("MagnitudeImportance", p=2, **_FIRST)),
             "L2 norm of each filter")
CRITERIA.add("fpgm", Criterion(_importance("FPGMImportance", **_FIRST)),
             "distance to the filters' geometric median (He et al., CVPR 2019)")
CRITERIA.add("bn_scale", Criterion(_importance("BNScaleImportance", normalizer=None), needs_batchnorm=True),
             "|gamma| of the following BatchNorm (network slimming, Liu et al., ICCV 2017)")
CRITERIA.add("taylor", Criterion(_importance("TaylorImportance", **_FIRST), needs_gradients=True),
             "first-order Taylor |weight x gradient| over minibatches (Molchanov et al., ICLR 2017)")
CRITERIA.add("random", Criterion(_importance("RandomImportance")),
             "uniformly random channels (the baseline every criterion must beat)")


@dataclass(frozen=True)
class PrunableLayer:
    channels: int  # output channels (Conv) or features (Linear)
    batchnorm: bool  # a BatchNorm normalises these channels

    def criteria(self) -> list[str]:
        """The registered criteria that can score this layer."""
        return [e.name for e in CRITERIA if self.batchnorm or not e.value.needs_batchnorm]


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
    prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
    group = graph.get_pruning_group(layer, prune_fn, idxs=[0])
    return any(isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm) for dep, _ in group)


def channels_to_remove(channels: int, sparsity: float) -> int:
    """How many of ``channels`` a sparsity removes; at least one channel always stays."""
    return min(int(round(channels * sparsity)), channels - 1)


def _accumulate_gradients(model: nn.Module, data: Split, batches: int = 4, batch_size: int = 64) -> None:
    model.zero_grad()
    model.train()
    for i, (x, y) in enumerate(data.batches(batch_size)):
        if i == batches:
            break
        nn.functional.cross_entropy(model(x), y).backward()
    model.eval()


def prune(model: nn.Module, example_input: Tensor, plan: dict[str, tuple[float, str]],
          data: Split, seed: int = 0) -> nn.Module:
    """Remove channels in place: ``plan`` maps a layer name to (sparsity, criterion name)."""
    tp = _tp()
    seed_everything(seed)
    modules = dict(model.named_modules())
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input)
    criteria = {name: CRITERIA.get(criterion) for name, (_, criterion) in plan.items()}
    if any(c.needs_gradients for c in criteria.values()):
        _accumulate_gradients(model, data)
    for name, (sparsity, _) in plan.items():
        layer = modules[name]
        n_remove = channels_to_remove(graph.get_out_channels(layer), sparsity)
        if n_remove == 0:
            continue
        prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_fn, idxs=list(range(graph.get_out_channels(layer))))
        scores = criteria[name].make()(group)  # (C_out,)
        idxs = torch.argsort(scores, stable=True)[:n_remove].tolist()
        graph.get_pruning_group(layer, prune_fn, idxs=idxs).prune()
    model.zero_grad(set_to_none=True)
    return model
