"""Pruning criteria: how to score the output channels of a layer (lowest scores go first).

A criterion builds a callable ``score(group) -> Tensor (C,)`` in torch-pruning's ``Importance``
form, where ``group`` is the dependency group rooted at the first member of a pruning group
(``groups.py``), so a group is ranked the same whichever member a recipe names. Weight- and gradient-based
criteria are torch-pruning's importances; activation-based ones read the layer's
pre-activations (the following BatchNorm's output where there is one) recorded on training data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autocomp.features import Tap
from autocomp.registry import Registry
from autocomp.train import Split

Score = Callable[[object], Tensor]  # group -> (C,) channel scores


@dataclass(frozen=True)
class Criterion:
    """``make(preactivations or None) -> score``, and what the criterion needs to be computed."""

    make: Callable[[Tensor | None], Score]
    needs_gradients: bool = False  # .grad of the weights, accumulated over minibatches
    needs_batchnorm: bool = False  # a BatchNorm after the layer
    needs_activations: bool = False  # the layer's (M, C) pre-activations on training data
    # unstructured pruning: a score per weight from (weight, its gradient or None); None: channels only
    weight_score: Callable[[Tensor, Tensor | None], Tensor] | None = None


CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def _tp_importance(name: str, **kwargs) -> Callable[[Tensor | None], Score]:
    """``torch_pruning.importance.<name>(**kwargs)``, imported on first use."""

    def make(_activations: Tensor | None) -> Score:
        import torch_pruning

        return getattr(torch_pruning.importance, name)(**kwargs)

    return make


def _from_weights(statistic: Callable[[Tensor], Tensor]) -> Callable[[Tensor | None], Score]:
    """Score the root layer's filters, its weight viewed as (C_out, K)."""

    def score(group) -> Tensor:
        return statistic(group[0].dep.target.module.weight.detach().flatten(1))

    return lambda _activations: score


def lamp_weight_score(w: Tensor, _grad: Tensor | None) -> Tensor:
    """LAMP per weight: w^2 over the sum of w'^2 of the weights at least as large (Lee et al., 2021)."""
    w2 = w.flatten().pow(2)
    order = w2.argsort(descending=True)
    scores = torch.empty_like(w2)
    scores[order] = w2[order] / w2[order].cumsum(0)  # denominator: this weight and every larger one
    return scores.view_as(w)


def fpgm_score(w: Tensor) -> Tensor:
    """Sum of L2 distances to the other filters: smallest near the geometric median. w: (C, K)."""
    return torch.cdist(w, w).sum(1)


def _from_activations(statistic: Callable[[Tensor], Tensor]) -> Callable[[Tensor | None], Score]:
    return lambda activations: lambda _group: statistic(activations)


def apoz_score(a: Tensor) -> Tensor:
    """1 - APoZ: the fraction of non-zero outputs after the ReLU, per channel. a: (M, C)."""
    return (a > 0).float().mean(0)


def variance_score(a: Tensor) -> Tensor:
    """Variance of each channel's output: a near-constant channel carries no information."""
    return a.var(0)


def redundancy_score(a: Tensor) -> Tensor:
    """Greedy de-correlation rank: repeatedly drop the channel most correlated with a kept one.

    The first channel dropped scores 0, the next 1, ...; of two identical channels only one
    goes early. a: (M, C).
    """
    corr = torch.nan_to_num(torch.corrcoef(a.T)).abs().fill_diagonal_(0.0)  # (C, C)
    kept, scores = list(range(a.shape[1])), torch.empty(a.shape[1])
    for rank in range(a.shape[1]):
        sub = corr[kept][:, kept]
        drop = kept[int(sub.max(1).values.argmax())]
        scores[drop] = rank
        kept.remove(drop)
    return scores


# "first": a channel is scored by its root layer's own weights, as the papers define it.
_FIRST = {"group_reduction": "first", "normalizer": None}
for _name, _criterion, _description in [
    ("l1", Criterion(_tp_importance("MagnitudeImportance", p=1, **_FIRST), weight_score=lambda w, g: w.abs()),
     "L1 norm of each filter; |w| per weight (Li et al., ICLR 2017; Han et al., NeurIPS 2015)"),
    ("l2", Criterion(_tp_importance("MagnitudeImportance", p=2, **_FIRST), weight_score=lambda w, g: w.pow(2)),
     "L2 norm of each filter; w^2 per weight"),
    ("fpgm", Criterion(_from_weights(fpgm_score)),
     "distance to the filters' geometric median (He et al., CVPR 2019)"),
    ("bn_scale", Criterion(_tp_importance("BNScaleImportance", normalizer=None), needs_batchnorm=True),
     "|gamma| of the following BatchNorm (network slimming, Liu et al., ICCV 2017)"),
    ("taylor", Criterion(_tp_importance("TaylorImportance", **_FIRST), needs_gradients=True,
                         weight_score=lambda w, g: (w * g).abs()),
     "first-order Taylor |weight x gradient| over minibatches (Molchanov et al., ICLR 2017)"),
    ("lamp", Criterion(_tp_importance("LAMPImportance", p=2, group_reduction="first"), weight_score=lamp_weight_score),
     "layer-adaptive magnitude score |w|^2 / sum of larger |w|^2 (Lee et al., ICLR 2021)"),
    ("apoz", Criterion(_from_activations(apoz_score), needs_activations=True),
     "average percentage of zeros after the ReLU on training data (Hu et al., 2016)"),
    ("variance", Criterion(_from_activations(variance_score), needs_activations=True),
     "variance of the channel's output on training data: near-constant channels go first"),
    ("redundancy", Criterion(_from_activations(redundancy_score), needs_activations=True),
     "correlation between channel outputs: one of each redundant pair goes first (Suau et al., 2018)"),
    ("random", Criterion(_tp_importance("RandomImportance"), weight_score=lambda w, g: torch.rand_like(w)),
     "uniformly random channels (the baseline every criterion must beat)"),
]:
    CRITERIA.add(_name, _criterion, _description)


def applicable(granularity: str = "channel", batchnorm: bool = True) -> list[str]:
    """The criteria that can score channels (of a layer with or without a BatchNorm after it) or,
    for granularity "weight", single weights."""
    if granularity == "weight":
        return [e.name for e in CRITERIA if e.value.weight_score is not None]
    return [e.name for e in CRITERIA if batchnorm or not e.value.needs_batchnorm]


def preactivation_module(graph, layer: nn.Module) -> nn.Module:
    """The BatchNorm that normalises ``layer``'s channels, else the layer itself."""
    prune_fn = graph.get_pruner_of_module(layer).prune_out_channels
    group = graph.get_pruning_group(layer, prune_fn, idxs=[0])
    norms = [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm)]
    return norms[0] if norms else layer


@torch.no_grad()
def record_preactivations(model: nn.Module, graph, names: list[str], data: Split,
                          samples: int = 256) -> dict[str, Tensor]:
    """Each named layer's pre-activations on the first ``samples`` training inputs, as (M, C)."""
    if not names:
        return {}
    modules = dict(model.named_modules())
    module_names = {m: n for n, m in modules.items()}
    taps = {name: module_names[preactivation_module(graph, modules[name])] for name in names}
    with Tap(model, list(taps.values())) as tap:
        model.eval()(data.x[:samples])
        return {name: tap.values[source].movedim(1, -1).reshape(-1, tap.values[source].shape[1])
                for name, source in taps.items()}


def accumulate_gradients(model: nn.Module, data: Split, batches: int = 4, batch_size: int = 64) -> None:
    """Fill each weight's ``.grad`` with the cross-entropy gradient summed over a few minibatches."""
    model.zero_grad()
    model.train()
    for i, (x, y) in enumerate(data.batches(batch_size)):
        if i == batches:
            break
        nn.functional.cross_entropy(model(x), y).backward()
    model.eval()
