from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from autocomp.compress.qat import quantization_aware
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
        fit(small_cnn, data(), lambda s, x, y: torch.nn.functional.cross_entropy(s, y), epochs=2, lr=1e-2,
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
