"""Unstructured pruning, sparse training with regrowth, and the sparse artifact."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from autocomp import runtime
from autocomp.compress.pack import DECODER_BYTES, container_bits
from autocomp.compress.prune import (
    finalize_masks,
    latent_weight,
    prunable_layers,
    prune,
    regrow,
    rewind,
    weight_mask,
)
from autocomp.compress.quantize import deploy
from autocomp.recipe import LayerPrune, Prune, Quantize
from autocomp.train import Split, fit

X = torch.zeros(1, 1, 8, 8)


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))


def weight_prune(model, **spec) -> None:
    prune(model, X, Prune(granularity="weight", **spec), prunable_layers(model, X), data())


def test_magnitude_masks_exactly_the_smallest_weights(small_cnn):
    w = small_cnn.conv2.weight.detach().clone()
    weight_prune(small_cnn, layers={"conv2": LayerPrune(0.75, "l1")})
    kept = small_cnn.conv2.weight.detach() != 0
    assert int(kept.sum()) == w.numel() // 4
    assert w[kept].abs().min() >= w[~kept].abs().max()  # every kept weight outweighs every pruned one
    assert small_cnn.conv2.out_channels == 16  # nothing is removed: weights are masked


def test_masks_hold_through_training_and_become_permanent(small_cnn):
    weight_prune(small_cnn, layers={"fc1": LayerPrune(0.5, "taylor")})
    fit(small_cnn, data(), lambda s, x, y, i: torch.nn.functional.cross_entropy(s, y), epochs=2, lr=1e-2,
        batch_size=16, progress=False)
    assert float((small_cnn.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    finalize_masks(small_cnn)
    assert weight_mask(small_cnn.fc1) is None and "weight" in dict(small_cnn.fc1.named_parameters())
    assert float((small_cnn.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_iterative_rounds_grow_one_mask_in_place(small_cnn):
    spec = Prune(granularity="weight", layers={"fc1": LayerPrune(0.5, "taylor")})
    original = prunable_layers(small_cnn, X)
    prune(small_cnn, X, spec, original, data(), progress=0.5)
    halfway = weight_mask(small_cnn.fc1).clone()
    prune(small_cnn, X, spec, original, data(), progress=1.0)
    final = weight_mask(small_cnn.fc1)
    assert (float(halfway.mean()), float(final.mean())) == (0.75, 0.5)
    assert torch.all(final[halfway == 0] == 0)  # a weight masked in the first round stays masked
    assert len(small_cnn.fc1.parametrizations.weight) == 1  # the same mask, updated


def test_global_unstructured_respects_the_floor_per_layer(small_cnn):
    weight_prune(small_cnn, scope="global", sparsity=0.95, criterion="l1", min_keep=0.2)
    for name in ("conv1", "conv2", "fc1"):
        w = getattr(small_cnn, name).weight
        assert int((w != 0).sum()) == math.ceil(0.2 * w.numel())


def test_regrowth_keeps_the_rate_and_moves_the_mask(small_cnn):
    weight_prune(small_cnn, layers={"fc1": LayerPrune(0.8, "l1")})
    before = weight_mask(small_cnn.fc1).clone()
    regrow(small_cnn, 0.25, torch.Generator().manual_seed(0))
    after = weight_mask(small_cnn.fc1)
    assert after.sum() == before.sum()  # the sparsity rate is kept
    assert int((before - after).clamp(min=0).sum()) == round(0.25 * int(before.sum()))  # dropped = regrown
    grown = (after - before).clamp(min=0).bool()
    assert torch.all(latent_weight(small_cnn.fc1)[grown] == 0)  # regrown weights start from zero


STORAGE = {"fp32": {}, "fp16": {"bits": 16}, "int4": {"bits": 4, "symmetric": False, "per_channel": True},
           "int8": {"bits": 8}, "kmeans4": {"bits": 4, "kmeans": True},
           "int8_kernels": {"bits": 8, "activation_bits": 8, "per_channel": True}}


@pytest.mark.parametrize(("sparsity", "storage"), [(0.5, "fp32"), (0.9, "fp32"), (0.9, "fp16"), (0.9, "int4"),
                                                   (0.5, "int4"), (0.9, "int8"), (0.9, "kmeans4"),
                                                   (0.9, "int8_kernels")])
def test_sparse_artifact_is_smaller_and_exact(small_cnn, tmp_path, sparsity, storage):
    weight_prune(small_cnn, scope="global", sparsity=sparsity, criterion="l1", min_keep=0.05)
    finalize_masks(small_cnn)
    spec, x = Quantize(**STORAGE[storage]), torch.rand(16, 1, 8, 8)
    dense = deploy(small_cnn, X, spec, x.numpy(), tmp_path / "dense.onnx")
    sparse = deploy(small_cnn, X, spec, x.numpy(), tmp_path / "sparse.onnx", sparse=True)
    weights = sum(m.weight.numel() for m in (small_cnn.conv1, small_cnn.conv2, small_cnn.fc1))
    zeros = sum(int((m.weight == 0).sum()) for m in (small_cnn.conv1, small_cnn.conv2, small_cnn.fc1))
    stored = container_bits(spec.bits)
    saved = dense.stat().st_size - sparse.stat().st_size
    assert saved > (zeros * stored - weights) / 8 - 3 * DECODER_BYTES  # per zero its code, less a bit per weight
    out = runtime.run(runtime.session(sparse), x.numpy())
    if spec.kmeans:  # the codebook clusters the kept weights only, so it differs from the dense one
        reference = small_cnn(x).detach().numpy()
        assert np.abs(out - reference).max() < 0.5 * np.abs(reference).max()
    else:  # the same codes, stored otherwise
        np.testing.assert_allclose(out, runtime.run(runtime.session(dense), x.numpy()), rtol=1e-5, atol=1e-5)
    ops = {n.op_type for n in onnx.load(str(sparse)).graph.node}
    assert {"BitShift", "CumSum", "Gather"} <= ops
    kernels = runtime.kernels(sparse, X.numpy())
    assert "BitShift" not in kernels and "Gather" not in kernels  # folded when the session loads
    dense_kernels = runtime.layer_kernels(dense)
    for layer, kernel in runtime.layer_kernels(sparse).items():  # the same, but sparse 4-bit Linear is fp32
        assert kernel == dense_kernels[layer] or (dense_kernels[layer], kernel) in {("MatMulNBits", "Gemm"),
                                                                                   ("MatMulNBits", "FusedGemm")}


def test_rewinding_restores_the_early_values_on_kept_weights_and_keeps_the_pruned_ones_zero(small_cnn):
    """Lottery-ticket rewinding: the mask comes from the trained weights, the values from early in training."""
    torch.manual_seed(3)
    early = {k: v.clone() for k, v in type(small_cnn)().state_dict().items()}  # another point of the same network
    weight_prune(small_cnn, layers={"conv2": LayerPrune(0.5, "l1"), "fc1": LayerPrune(0.8, "l1")})
    masks = {name: weight_mask(getattr(small_cnn, name)).clone() for name in ("conv2", "fc1")}
    rewind(small_cnn, early)
    for name, mask in masks.items():
        layer = getattr(small_cnn, name)
        assert torch.equal(weight_mask(layer), mask)  # the mask is kept
        assert torch.equal(layer.weight.detach(), early[f"{name}.weight"] * mask)  # early values, pruned ones zero
        assert torch.equal(latent_weight(layer).detach(), early[f"{name}.weight"])
    state = small_cnn.state_dict()
    for name in ("conv1.weight", "conv1.bias", "fc2.weight", "fc1.bias"):
        assert torch.equal(state[name], early[name])  # unmasked parameters and biases rewound too
    with pytest.raises(ValueError, match=r"cannot rewind fc2.bias: the early state has no such entry \(1 of"):
        rewind(small_cnn, {k: v for k, v in early.items() if k != "fc2.bias"})  # another network's state
    with pytest.raises(ValueError, match=r"cannot rewind conv1.weight: its shape is \(8, 1, 3, 3\) now"):
        rewind(small_cnn, {**early, "conv1.weight": torch.zeros(4, 1, 3, 3)})  # channels pruned away
