from __future__ import annotations

import pytest
import torch

from autocomp.compress.criteria import CRITERIA
from autocomp.compress.prune import channels_to_remove, prunable_layers, prune
from autocomp.recipe import LayerPrune, Prune
from autocomp.train import Split
from tests.conftest import prune_local

X = torch.zeros(1, 1, 8, 8)


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_removes_channels_and_the_model_still_runs(small_cnn, criterion):
    fc_criterion = "l1" if CRITERIA.get(criterion).needs_batchnorm else criterion
    plan = {"conv1": (0.5, criterion), "conv2": (0.25, criterion), "fc1": (0.5, fc_criterion)}
    prune_local(small_cnn, plan, data())
    assert (small_cnn.conv1.out_channels, small_cnn.bn1.num_features, small_cnn.conv2.in_channels) == (4, 4, 4)
    assert (small_cnn.conv2.out_channels, small_cnn.fc1.in_features) == (12, 12 * 16)
    assert (small_cnn.fc1.out_features, small_cnn.fc2.in_features, small_cnn.fc2.out_features) == (16, 16, 10)
    assert small_cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert all(p.grad is None for p in small_cnn.parameters())


def test_l1_removes_the_filter_with_the_smallest_l1_norm(small_cnn):
    with torch.no_grad():
        small_cnn.conv1.weight.fill_(1.0)
        small_cnn.conv1.weight[5] = 0.01  # filter 5: L1 = 0.09, every other: 9
        small_cnn.conv1.weight[2] = -0.5  # large negative weights still count by magnitude
    kept = [i for i in range(8) if i != 5]
    expected = small_cnn.conv1.weight[kept].clone()
    prune_local(small_cnn, {"conv1": (1 / 8, "l1")}, data())
    assert torch.equal(small_cnn.conv1.weight, expected)


def test_bn_scale_removes_the_channel_with_the_smallest_gamma(small_cnn):
    with torch.no_grad():
        small_cnn.bn2.weight.copy_(torch.linspace(1.0, 2.0, 16))
        small_cnn.bn2.weight[9] = 1e-3
    expected = torch.cat([small_cnn.conv2.weight[:9], small_cnn.conv2.weight[10:]]).clone()
    prune_local(small_cnn, {"conv2": (1 / 16, "bn_scale")}, data())
    assert torch.equal(small_cnn.conv2.weight, expected)


def test_pruning_keeps_at_least_one_channel():
    assert channels_to_remove(8, 0.99) == 7
    assert channels_to_remove(10, 0.04) == 0
    assert channels_to_remove(10, 0.25) == 2  # round half to even


def test_prunable_layers_report_channels_and_batchnorm(small_cnn):
    layers = prunable_layers(small_cnn, X)
    assert {n: (layer.channels, layer.batchnorm) for n, layer in layers.items()} == {
        "conv1": (8, True), "conv2": (16, True), "fc1": (32, False)}
    assert "bn_scale" in layers["conv1"].criteria() and "bn_scale" not in layers["fc1"].criteria()


def test_global_scope_ranks_channels_across_layers(small_cnn):
    with torch.no_grad():
        small_cnn.conv2.weight[8:] *= 0.01  # half of conv2 is far below its layer's mean
    kept = small_cnn.conv2.weight[:8].clone()
    spec = Prune(scope="global", sparsity=8 / 56, criterion="l1", min_keep=0.25)
    prune(small_cnn, X, spec, prunable_layers(small_cnn, X), data())
    assert (small_cnn.conv1.out_channels, small_cnn.conv2.out_channels, small_cnn.fc1.out_features) == (8, 8, 32)
    assert torch.equal(small_cnn.conv2.weight, kept)


def test_global_scope_never_collapses_a_layer(small_cnn):
    spec = Prune(scope="global", sparsity=0.9, criterion="random", min_keep=0.5)
    prune(small_cnn, X, spec, prunable_layers(small_cnn, X), data())
    assert (small_cnn.conv1.out_channels, small_cnn.conv2.out_channels, small_cnn.fc1.out_features) == (4, 8, 16)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_iterative_rounds_reach_the_target_in_steps(small_cnn, scope):
    original = prunable_layers(small_cnn, X)
    spec = Prune(scope=scope, layers={"conv2": LayerPrune(0.5, "l2")}, sparsity=8 / 56, criterion="l2", min_keep=0.5)
    prune(small_cnn, X, spec, original, data(), progress=0.5)
    halfway = sum(layer.channels for layer in prunable_layers(small_cnn, X).values())
    prune(small_cnn, X, spec, original, data(), progress=1.0)
    final = sum(layer.channels for layer in prunable_layers(small_cnn, X).values())
    assert (halfway, final) == (52, 48)
    prune(small_cnn, X, spec, original, data(), progress=1.0)  # the target is reached: nothing more goes
    assert sum(layer.channels for layer in prunable_layers(small_cnn, X).values()) == 48
