from __future__ import annotations

import numpy as np
import pytest
import torch

from autocomp import runtime
from autocomp.compress.calibrate import CALIBRATORS
from autocomp.compress.quantize import quantize_int8
from autocomp.measure import latency_ms
from autocomp.recipe import Measure


def test_onnx_artifact_reloads_to_the_same_outputs(small_cnn, tmp_path):
    path = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    x = torch.randn(37, 1, 8, 8)  # a batch size other than the example's: the batch axis is dynamic
    out = runtime.run(runtime.session(path), x.numpy())
    np.testing.assert_allclose(out, small_cnn(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("calibration", CALIBRATORS.names())
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_artifact_is_smaller_and_close(small_cnn, tmp_path, calibration, per_channel):
    fp32 = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "fp32.onnx")
    x = torch.rand(128, 1, 8, 8)
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", x.numpy(), calibration, per_channel)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]  # no leftovers
    ops = {node.op_type for node in __import__("onnx").load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    reference = small_cnn(x).detach().numpy()
    quantized = runtime.run(runtime.session(int8), x.numpy())
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()
    assert (quantized.argmax(1) == reference.argmax(1)).mean() > 0.8


def test_latency_is_a_median_with_spread(small_cnn, tmp_path):
    path = runtime.export_onnx(small_cnn, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    result = latency_ms(runtime.session(path), np.zeros((1, 1, 8, 8), np.float32), Measure(batch_size=4))
    assert 0 < result["latency_p10_ms"] <= result["latency_ms"] <= result["latency_p90_ms"]
