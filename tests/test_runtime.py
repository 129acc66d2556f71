from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autocomp import runtime
from autocomp.compress.calibrate import CALIBRATORS, fake_quantize, weight_range
from autocomp.compress.pack import NBITS, container_bits
from autocomp.compress.quantize import deploy
from autocomp.recipe import Quantize


def test_onnx_artifact_reloads_to_the_same_outputs(small_cnn, tmp_path):
    path = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    x = torch.randn(37, 1, 8, 8)  # a batch size other than the example's: the batch axis is dynamic
    out = runtime.run(runtime.session(path), x.numpy())
    np.testing.assert_allclose(out, small_cnn(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def deploy_small(model, tmp_path, **quantize) -> tuple:
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    path = deploy(model, torch.zeros(1, 1, 8, 8), Quantize(**quantize), x.numpy(), tmp_path / "model.onnx")
    return path, model(x).detach().numpy(), runtime.run(runtime.session(path), x.numpy())


@pytest.mark.parametrize("calibration", CALIBRATORS.names())
@pytest.mark.parametrize("per_channel", [False, True])
def test_static_int8_runs_on_int8_kernels_and_stays_close(small_cnn, tmp_path, calibration, per_channel):
    fp32 = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "fp32.onnx")
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=8, activation_bits=8,
                                              calibration=calibration, per_channel=per_channel)
    assert path.stat().st_size < 0.5 * fp32.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "model.onnx"]  # no leftovers
    kernels = runtime.kernels(path, np.zeros((1, 1, 8, 8), np.float32))
    assert kernels.get("QLinearConv") == 2  # both convolutions on int8 kernels
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()
    assert (quantized.argmax(1) == reference.argmax(1)).mean() > 0.8


WEIGHTS = 8 * 9 + 16 * 8 * 9 + 32 * 256 + 10 * 32  # SmallCNN weight count (biases stay fp32)


@pytest.mark.parametrize(("bits", "kmeans"), [(16, False), (8, False), (6, False), (4, False), (3, False),
                                              (2, False), (4, True), (2, True)])
def test_weight_only_quantization_stores_packed_bits_and_runs_fp32(small_cnn, tmp_path, bits, kmeans):
    fp32 = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "fp32.onnx").stat().st_size
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=bits, per_channel=True, kmeans=kmeans)
    stored = 16 if bits == 16 else container_bits(bits)
    model = onnx.load(str(path))
    nbits = bits in NBITS and not kmeans  # the Linear layers keep 4-bit codes, two a byte, for MatMulNBits
    packed = [i for i in model.graph.initializer if i.name.endswith(("_fp16", "_q", "_idx", "_nbits"))]
    assert len(packed) == 4 and all(len(i.raw_data) == math.ceil(math.prod(i.dims) * stored / 8) for i in packed
                                    if not i.name.endswith("_nbits"))
    assert sum(math.prod(i.dims) * (2 if i.name.endswith("_nbits") else 1) for i in packed) == WEIGHTS
    assert path.stat().st_size < fp32 - WEIGHTS * (32 - stored) / 8 * 0.9  # the file really shrinks
    kernels = runtime.kernels(path, np.zeros((1, 1, 8, 8), np.float32))
    assert "QLinearConv" not in kernels and kernels.get("FusedConv", 0) + kernels.get("Conv", 0) == 2
    assert kernels.get("MatMulNBits", 0) == (2 if nbits else 0)
    assert not {"DequantizeLinear", "Cast", "Mul", "Gather"} & set(kernels)  # weights decoded once, at load
    error = np.abs(quantized - reference).max() / np.abs(reference).max()
    assert error < {16: 1e-3, 8: 0.02, 6: 0.05}.get(bits, 0.8)


@pytest.mark.parametrize(("symmetric", "per_channel"), [(True, False), (False, True)])
def test_4bit_linear_layers_run_matmulnbits_on_the_recipe_grid(tmp_path, symmetric, per_channel):
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 24).eval()  # K = 40: one 64-wide block, zero-padded past K
    x = torch.randn(16, 40)
    path = deploy(model, x[:1], Quantize(bits=4, symmetric=symmetric, per_channel=per_channel), x.numpy(),
                  tmp_path / "m.onnx")
    assert runtime.kernels(path, x[:1].numpy()) == {"MatMulNBits": 1}
    w = model.weight.detach()
    lo, hi = weight_range(w, per_channel, symmetric)
    expected = torch.nn.functional.linear(x, fake_quantize(w, lo, hi, 4, symmetric, axis=0 if per_channel else None),
                                          model.bias)
    np.testing.assert_allclose(runtime.run(runtime.session(path), x.numpy()), expected.detach().numpy(),
                               rtol=1e-4, atol=1e-4)


def test_asymmetric_weights_use_a_zero_point(small_cnn, tmp_path):
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=6, symmetric=False)
    zero_points = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name.endswith("_zp")]
    assert len(zero_points) == 4 and all(0 < z.item() < 63 and z.item() == round(z.item()) for z in zero_points)
    assert np.abs(quantized - reference).max() < 0.2 * np.abs(reference).max()


def test_mixed_precision_gives_each_layer_its_own_storage(small_cnn, tmp_path):
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=8, per_channel=True,
                                              layers={"conv1": 32, "conv2": 2, "fc1": 4})
    widths = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert widths["conv1.weight"] == onnx.TensorProto.FLOAT  # kept fp32
    assert (widths["conv2.weight_q"], widths["fc1.weight_nbits"], widths["fc2.weight_q"]) == (
        onnx.TensorProto.INT2, onnx.TensorProto.UINT8, onnx.TensorProto.INT8)  # fc1: 4-bit pairs for MatMulNBits


def test_static_int8_can_keep_a_layer_in_fp32(small_cnn, tmp_path):
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=8, activation_bits=8, layers={"conv1": 32})
    kernels = runtime.kernels(path, np.zeros((1, 1, 8, 8), np.float32))
    assert kernels.get("QLinearConv") == 1 and kernels.get("FusedConv", 0) + kernels.get("Conv", 0) == 1
    layers = runtime.layer_kernels(path)
    assert layers.pop("conv1") in ("Conv", "FusedConv") and layers == {"conv2": "QLinearConv", "fc1": "QGemm",
                                                                       "fc2": "QGemm"}


@pytest.mark.parametrize(("fp32", "weights"), [(["fc1"], 8), (["fc1"], 4), (["fc2"], 8), (["conv2"], 8),
                                               (["conv2", "fc1"], 8)])
def test_static_int8_runs_each_layer_on_the_kernel_its_activation_bits_ask(small_cnn, tmp_path, fp32, weights):
    # an fp32 layer between int8 layers: ONNX Runtime quantizes its weight itself if a per-tensor DequantizeLinear
    # feeds it, and the int8 layer before it must keep its int8 output
    path, reference, quantized = deploy_small(small_cnn, tmp_path, bits=8, activation_bits=8,
                                              layers=dict.fromkeys(fp32, weights),
                                              activation_layers=dict.fromkeys(fp32, 32))
    int8 = {"conv1": "QLinearConv", "conv2": "QLinearConv", "fc1": "QGemm", "fc2": "QGemm"}
    fp32_kernels = {"Conv", "FusedConv", "Gemm", "FusedGemm"} if weights == 8 else {"MatMulNBits"}
    kernels = runtime.layer_kernels(path)
    assert set(kernels) == set(int8)
    for layer, kernel in kernels.items():
        assert kernel in fp32_kernels if layer in fp32 else kernel == int8[layer]
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()
