from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from autocomp.compress.prune import (
    WeightMask,
    finalize_masks,
    latent_weight,
    prunable_layers,
    prune,
    regrow,
    weight_mask,
)
from autocomp.compress.qat import quantization_aware
from autocomp.recipe import LayerPrune, Prune
from autocomp.train import Split, fit

LAYERS = dict.fromkeys(["conv1", "conv2", "fc1", "fc2"], 8)


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))


def test_layers_compute_with_weights_on_the_int8_grid(small_cnn):
    with quantization_aware(small_cnn, LAYERS, data().x, "minmax", per_channel=True):
        w = small_cnn.conv2.weight  # (16, 8, 3, 3), fake-quantized on access
        step = w.detach().flatten(1).abs().amax(1) / 127
        levels = w.detach().flatten(1) / step[:, None]
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert parametrize.is_parametrized(small_cnn.conv2, "weight")
    assert not any(parametrize.is_parametrized(m) for m in small_cnn.modules())
    assert not any(m._forward_pre_hooks for m in small_cnn.modules())


def test_training_updates_the_float_weights_through_the_fake_quantizer(small_cnn):
    before = small_cnn.fc1.weight.detach().clone()
    with quantization_aware(small_cnn, LAYERS, data().x, "entropy"):
        quantized = small_cnn(data().x)
        fit(small_cnn, data(), lambda s, x, y, i: torch.nn.functional.cross_entropy(s, y), epochs=2, lr=1e-2,
            batch_size=16, progress=False)
    assert not torch.equal(small_cnn.fc1.weight, before)  # gradients reached the latent fp32 weights
    assert not torch.allclose(quantized, small_cnn(data().x))
    torch.testing.assert_close(small_cnn.fc1.weight, small_cnn.fc1.weight.data)  # a plain tensor again


def test_fake_quantized_forward_differs_from_float_only_by_quantization_noise(small_cnn):
    x = data().x
    reference = small_cnn(x).detach()
    with quantization_aware(small_cnn, LAYERS, x, "minmax"):
        quantized = small_cnn(x).detach()
    assert 0 < (quantized - reference).abs().max() < 0.1 * reference.abs().max()


def test_each_layer_trains_at_its_own_width(small_cnn):
    with quantization_aware(small_cnn, {"conv2": 4, "fc1": 8, "fc2": 32}, data().x, "minmax",
                            per_channel=True, quantize_inputs=False):
        w = small_cnn.conv2.weight.detach().flatten(1)
        assert all(len(torch.unique(row)) <= 16 for row in w)  # 4 bits: at most 16 levels per channel
        assert parametrize.is_parametrized(small_cnn.fc1) and not parametrize.is_parametrized(small_cnn.fc2)
        assert not parametrize.is_parametrized(small_cnn.conv1)  # not named: left alone
        assert not any(m._forward_pre_hooks for m in small_cnn.modules())  # weights only


def mask_half(model) -> None:
    """Mask the smaller half of conv2's and fc1's weights (unstructured, L1)."""
    x = torch.zeros(1, 1, 8, 8)
    spec = Prune(granularity="weight", layers={"conv2": LayerPrune(0.5, "l1"), "fc1": LayerPrune(0.5, "l1")})
    prune(model, x, spec, prunable_layers(model, x), data())


def fake_quant_by_hand(w: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-tensor min-max quantize-dequantize, written out: the grid holds 0, the zero point is an integer."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale, zero_point = w.abs().max() / qmax, 0.0
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        scale = torch.tensor((hi - lo) / (qmax - qmin))
        zero_point = float(torch.round(-lo / scale))
    return (torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax) - zero_point) * scale


@pytest.mark.parametrize("symmetric", [True, False])
def test_masked_layer_computes_with_the_fake_quantized_masked_weight(small_cnn, symmetric):
    mask_half(small_cnn)
    mask = weight_mask(small_cnn.fc1)
    latent_weight(small_cnn.fc1).data[tuple((mask == 0).nonzero()[0])] = 10.0  # pruned: must not widen the grid
    latent = latent_weight(small_cnn.fc1).detach().clone()
    expected = fake_quant_by_hand(latent * mask, 4, symmetric)  # the range is the masked weight's, zeros included
    h = torch.rand(8, 256)
    with quantization_aware(small_cnn, {"fc1": 4}, data().x, "minmax", symmetric=symmetric, quantize_inputs=False):
        torch.testing.assert_close(small_cnn.fc1.weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(small_cnn.fc1(h), torch.nn.functional.linear(h, expected, small_cnn.fc1.bias))
        assert torch.all(small_cnn.fc1.weight[mask == 0] == 0)  # exactly zero through the quantizer
    torch.testing.assert_close(small_cnn.fc1.weight, latent * mask, rtol=0, atol=0)  # the mask stays, unquantized
    assert [type(p) for p in small_cnn.fc1.parametrizations.weight] == [WeightMask]


def test_pruned_weights_get_no_gradient_and_stay_zero_through_quantization_aware_sparse_training(small_cnn):
    mask_half(small_cnn)
    before, initial_mask = latent_weight(small_cnn.conv2).detach().clone(), weight_mask(small_cnn.conv2).clone()
    with quantization_aware(small_cnn, LAYERS, data().x, "minmax", per_channel=True, symmetric=False):
        torch.nn.functional.cross_entropy(small_cnn.train()(data().x), data().y).backward()
        for layer in (small_cnn.conv2, small_cnn.fc1):
            grad, mask = latent_weight(layer).grad, weight_mask(layer)
            assert torch.all(layer.weight[mask == 0] == 0)  # 0 is a level of each channel's asymmetric grid
            assert torch.all(grad[mask == 0] == 0) and (grad[mask == 1] != 0).float().mean() > 0.5  # STE to the kept
        fit(small_cnn, data(), lambda s, x, y, i: torch.nn.functional.cross_entropy(s, y), epochs=3, lr=1e-2,
            batch_size=16, on_epoch_end=lambda g: regrow(small_cnn, 0.2, g), progress=False)
    mask = weight_mask(small_cnn.conv2).clone()
    assert not torch.equal(mask, initial_mask) and float(mask.mean()) == 0.5  # regrown, at the same sparsity
    finalize_masks(small_cnn)
    w = small_cnn.conv2.weight.detach()
    assert not parametrize.is_parametrized(small_cnn.conv2) and not torch.equal(w, before)  # trained, plain again
    assert torch.all(w[mask == 0] == 0)


def test_quantized_distillation_trains_fake_quantized_weights_on_the_teachers_soft_targets_at_once(small_cnn):
    """Quantized distillation (Polino et al., ICLR 2018): the student is distilled with its quantizers in place. It is
    the fine-tune's path when a recipe asks for QAT and a distillation loss (``pipeline.fine_tune`` nests the two):
    the loss is the soft-target term of the fake-quantized student's logits, and its gradient reaches the float
    weights through the quantizer."""
    from autocomp.compress.distill import Distiller
    from tests.conftest import SmallCNN

    torch.manual_seed(1)
    teacher, (x, y) = SmallCNN().eval(), (data().x, data().y)

    def soft_term(student_logits: torch.Tensor) -> torch.Tensor:  # T^2 KL(teacher_T || student_T), by hand, T = 4
        with torch.no_grad():
            target = torch.softmax(teacher(x) / 4, dim=1)
        return 16 * (target * (target.log() - torch.log_softmax(student_logits / 4, dim=1))).sum(1).mean()

    before = small_cnn.fc1.weight.detach().clone()
    with quantization_aware(small_cnn, {"conv2": 4, "fc1": 4}, x, "minmax", per_channel=True,
                            quantize_inputs=False), \
            Distiller(teacher, small_cnn, x[:1], kind="logits", temperature=4.0, alpha=1.0) as loss:
        assert all(len(torch.unique(row)) <= 16 for row in small_cnn.fc1.weight)  # 4-bit weights in the forward
        logits = small_cnn.train()(x)
        value = loss(logits, x, y)
        torch.testing.assert_close(value, soft_term(logits))  # alpha 1: the teacher's soft targets alone
        value.backward()
        assert small_cnn.fc1.parametrizations.weight.original.grad.abs().sum() > 0  # through the quantizer
        small_cnn.zero_grad()
        fit(small_cnn, data(), loss, epochs=3, lr=1e-2, batch_size=16, progress=False)
        after = soft_term(small_cnn.eval()(x)).item()
    assert not torch.equal(small_cnn.fc1.weight, before)  # the float weights learned
    assert after < value.item()  # closer to the teacher, computed with 4-bit weights
