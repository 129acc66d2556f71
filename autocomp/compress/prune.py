"""Structured pruning that physically removes channels, on torch-pruning's dependency graph.

Each layer's channels are scored by its criterion (``criteria.py``); the lowest-scored channels
are removed together with everything that depends on them (BatchNorm entries, the next layer's
input channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autocomp.compress.criteria import CRITERIA, accumulate_gradients, preactivation_module, record_preactivations
from autocomp.features import head_layer, layer_names
from autocomp.train import Split, seed_everything


def _tp():
    import torch_pruning

    return torch_pruning


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
    return preactivation_module(graph, layer) is not layer


def channels_to_remove(channels: int, sparsity: float) -> int:
    """How many of ``channels`` a sparsity removes; at least one channel always stays."""
    return min(int(round(channels * sparsity)), channels - 1)


def prune(model: nn.Module, example_input: Tensor, plan: dict[str, tuple[float, str]],
          data: Split, seed: int = 0) -> nn.Module:
    """Remove channels in place: ``plan`` maps a layer name to (sparsity, criterion name)."""
    tp = _tp()
    seed_everything(seed)
    modules = dict(model.named_modules())
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input)
    criteria = {name: CRITERIA.get(criterion) for name, (_, criterion) in plan.items()}
    if any(c.needs_gradients for c in criteria.values()):
        accumulate_gradients(model, data)
    # every score is taken on the unpruned model: pruning a layer renumbers only its own channels
    activations = record_preactivations(model, graph, [n for n, c in criteria.items() if c.needs_activations], data)
    for name, (sparsity, _) in plan.items():
        layer = modules[name]
        n_remove = channels_to_remove(graph.get_out_channels(layer), sparsity)
        if n_remove == 0:
            continue
        prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_fn, idxs=list(range(graph.get_out_channels(layer))))
        scores = criteria[name].make(activations.get(name))(group)  # (C_out,)
        idxs = torch.argsort(scores, stable=True)[:n_remove].tolist()
        graph.get_pruning_group(layer, prune_fn, idxs=idxs).prune()
    model.zero_grad(set_to_none=True)
    return model
