"""Pruning groups: the Conv/Linear layers whose output channels are tied one-to-one, the unit of channel pruning.

Removing output channel k of one member removes channel k of every other member too: the two inputs of a
residual add must keep the same width (``x + body(x)`` ties ``body``'s last layer to the layer producing
``x``), and a depthwise convolution has one filter per input channel (its channels belong to the group of the
layer feeding it). A concatenation does not tie its inputs: each producer is its own group, owning a slice of
the consumer's input channels. Groups come from torch-pruning's dependency graph: a layer joins every Conv/Linear
layer whose output channels its own pruning group removes.

A group is pruned as one: one target, one ranking of its channels (the criterion on the torch-pruning group
rooted at its first member, whichever member a recipe names) and one removal. ``check_metadata`` then holds
every module's size attributes against its weights, so a trial fails with the reason rather than reporting the
sizes (and MACs) of layers that do not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autocomp.compress.criteria import applicable
from autocomp.features import head_layer, layer_names


@dataclass(frozen=True)
class PruningGroup:
    """Layers pruned together: ``channels`` each, removed in multiples of ``divisor``."""

    name: str  # the first member in model order: the group's name in recipes and search spaces
    members: tuple[str, ...]  # in model order
    channels: int  # output channels (Conv) or features (Linear) of every member
    divisor: int  # a grouped (not depthwise) convolution on these channels loses as many in every group
    batchnorm: bool  # a BatchNorm normalises these channels

    def criteria(self, granularity: str = "channel") -> list[str]:
        """The registered criteria that can score this group's channels (or its layers' single weights)."""
        return applicable(granularity, self.batchnorm)


def dependency_graph(model: nn.Module, example_input: Tensor):
    """torch-pruning's dependency graph of ``model`` (traced in eval mode on ``example_input``). A parameter outside
    a layer (a position embedding, a class token) loses its last dimension longer than 1, torch-pruning's default,
    without the warning torch-pruning prints about it on every build (every trial)."""
    import torch_pruning

    return torch_pruning.DependencyGraph().build_dependency(model.eval(), example_inputs=example_input, verbose=False)


def dependency_group(graph, layer: nn.Module, idxs: list[int] | None = None):
    """The torch-pruning group that removes ``idxs`` (default: all) of ``layer``'s output channels."""
    prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
    return graph.get_pruning_group(layer, prune_fn, idxs=list(range(graph.get_out_channels(layer)))
                                   if idxs is None else idxs)


def pruning_groups(model: nn.Module, example_input: Tensor, graph=None) -> list[PruningGroup]:
    """The model's prunable groups in model order (of their first members).

    The group of the layer producing the model's output is left out: its channels are the classes.
    """
    graph = dependency_graph(model, example_input) if graph is None else graph
    modules = dict(model.named_modules())
    # a layer inside a module the graph keeps whole (nn.MultiheadAttention's out_proj) changes with that module
    names = [n for n in layer_names(model) if modules[n] in graph.module2node]
    by_module = {modules[n]: n for n in names}
    root = {n: n for n in names}  # union-find over layer names; a root is its set's first member

    def find(n: str) -> str:
        while root[n] != n:
            n = root[n]
        return n

    for name in names:
        for dep, _ in dependency_group(graph, modules[name]):
            target = dep.target.module
            if target in by_module and dep.handler == graph.get_pruner_of_module(target).prune_out_channels:
                first, other = sorted((find(name), find(by_module[target])), key=names.index)
                root[other] = first
    head = find(head_layer(model, example_input))
    return [_group(graph, modules, [n for n in names if find(n) == first])
            for first in names if find(first) == first and first != head]


def _group(graph, modules: dict[str, nn.Module], members: list[str]) -> PruningGroup:
    tied = [dep.target.module for dep, _ in dependency_group(graph, modules[members[0]], [0])]
    grouped = [m.groups for m in tied if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels]
    heads = [m.num_heads for m in tied if isinstance(m, nn.MultiheadAttention)]  # every head loses as many
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in tied)
    return PruningGroup(members[0], tuple(members), graph.get_out_channels(modules[members[0]]),
                        math.lcm(1, *grouped, *heads), batchnorm)


def balanced(channels: int, divisor: int, positions: list[int]) -> list[int]:
    """The channel indices at ``positions`` of each of ``divisor`` equal blocks of ``channels``."""
    block = channels // divisor
    return sorted(b * block + p for b in range(divisor) for p in positions)


def probe(model: nn.Module, example_input: Tensor, groups: list[PruningGroup]) -> dict[str, int | None]:
    """Each group's divisor as the model's own forward accepts it, or None where no removal leaves it running.

    The graph knows grouped convolutions and ``nn.MultiheadAttention``; a forward that reshapes by a count of its
    own (hand-written attention's ``reshape(b, n, heads, -1)``) only shows when run. One copy of the model loses
    one channel per block of every group; if it still runs and gives the same output shape, every divisor holds.
    Otherwise each group is tried alone with every multiple of its divisor that divides its channels, fewest
    blocks first: a hand-written attention of 4 heads over 32 channels fails with 1 and 2 blocks and runs with 4.
    """
    with torch.no_grad():
        expected = model.eval()(example_input).shape
    if not groups or _runs_pruned(model, example_input, expected, [(g, g.divisor) for g in groups]):
        return {g.name: g.divisor for g in groups}
    found: dict[str, int | None] = {}
    for g in groups:
        candidates = [d for d in range(g.divisor, g.channels // 2 + 1, g.divisor) if g.channels % d == 0]
        found[g.name] = next((d for d in candidates if _runs_pruned(model, example_input, expected, [(g, d)])), None)
    return found


def _runs_pruned(model: nn.Module, example_input: Tensor, expected: torch.Size,
                 removals: list[tuple[PruningGroup, int]]) -> bool:
    """Whether a copy of ``model`` in which each group of ``removals`` lost the first channel of each of its
    ``divisor`` blocks still runs, keeps its metadata and gives an output of the ``expected`` shape."""
    import copy

    trial = copy.deepcopy(model)
    try:
        graph = dependency_graph(trial, example_input)  # traced through autograd: not under no_grad
        for g, divisor in removals:
            dependency_group(graph, trial.get_submodule(g.name), balanced(g.channels, divisor, [0])).prune()
        check_metadata(trial)
        with torch.no_grad():
            return trial(example_input).shape == expected
    except Exception:  # noqa: BLE001 - whatever the forward raises, this removal does not fit the model
        return False


def check_metadata(model: nn.Module) -> None:
    """Raise if any module's size attributes disagree with its weights (a pruning bug, never bad input)."""
    problems = [f"{name or 'model'}: {problem}" for name, module in model.named_modules()
                for problem in _mismatches(module)]
    if problems:
        raise RuntimeError(f"Internal error: pruning left layer sizes out of step with the weights: {problems}")


def _mismatches(module: nn.Module) -> list[str]:
    """Each size attribute of ``module`` that is not what its tensors' shapes say."""
    return [f"{what} {actual} != {expected} (from the tensor shapes)"
            for what, actual, expected in _sizes(module) if actual != expected]


def _sizes(module: nn.Module) -> list[tuple[str, object, object]]:
    """(what, the attribute's value, the value the tensors imply) for each size attribute of ``module``."""
    if isinstance(module, nn.modules.conv._ConvNd):  # weight (out, in / groups, k...); transposed: (in, out / groups)
        w, groups = module.weight.shape, module.groups
        out, in_ = (w[1] * groups, w[0]) if module.transposed else (w[0], w[1] * groups)
        return [("out_channels", module.out_channels, out), ("in_channels", module.in_channels, in_),
                (f"out_channels % groups ({groups})", module.out_channels % groups, 0)]
    if isinstance(module, nn.Linear):
        return [("out_features", module.out_features, module.weight.shape[0]),
                ("in_features", module.in_features, module.weight.shape[1])]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(f"num_features (vs {t})", module.num_features, getattr(module, t).shape[0])
                for t in ("weight", "bias", "running_mean", "running_var") if getattr(module, t) is not None]
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return [("normalized_shape", tuple(module.normalized_shape), tuple(module.weight.shape))]
    return []
