"""Each ONNX Runtime behaviour ``autocomp.compress.ort_workarounds`` patches, shown on the installed ONNX Runtime
(a test fails once ONNX Runtime no longer behaves so: then its workaround can go), and the workaround's effect."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

import autocomp.compress.quantize
from autocomp import runtime
from autocomp.compress.ort_workarounds import FUSED, pre_process
from autocomp.compress.quantize import deploy
from autocomp.recipe import Quantize
from tests.zoo import Encoder


def initializers(path) -> set[str]:
    return {i.name for i in onnx.load(str(path)).graph.initializer}


def test_symbolic_shape_inference_fails_on_multihead_attention_and_the_fallback_prepares_it(tmp_path):
    fp32 = runtime.export_onnx(Encoder(norm_first=True).eval(), torch.zeros(1, 8, 8), tmp_path / "fp32.onnx")
    with pytest.raises(AssertionError):
        quant_pre_process(str(fp32), str(tmp_path / "plain.onnx"))
    pre_process(fp32, tmp_path / "prepared.onnx")
    assert "encoder.layers.0.linear1.weight" in initializers(tmp_path / "prepared.onnx")


def test_folding_batchnorm_renames_the_conv_weight_and_the_layer_name_comes_back(small_cnn, tmp_path):
    fp32 = runtime.export_onnx(small_cnn.eval(), torch.zeros(1, 1, 8, 8), tmp_path / "fp32.onnx")
    quant_pre_process(str(fp32), str(tmp_path / "plain.onnx"))
    assert {f"{FUSED}conv1.weight", f"{FUSED}conv2.weight"} <= initializers(tmp_path / "plain.onnx")
    pre_process(fp32, tmp_path / "prepared.onnx")
    names = initializers(tmp_path / "prepared.onnx")
    assert {"conv1.weight", "conv2.weight"} <= names and not any(n.startswith(FUSED) for n in names)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("quiet", [False, True])
def test_the_quantizer_warns_on_the_root_logger_unless_quieted(tmp_path, caplog, monkeypatch, quiet):
    if not quiet:
        monkeypatch.setattr(autocomp.compress.quantize, "quiet_quantizer", contextlib.nullcontext)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        deploy(Normed().eval(), x[:1], Quantize(bits=8, activation_bits=8, per_channel=True), x.numpy(),
               tmp_path / "model.onnx")
    warned = [r for r in caplog.records if r.name == "root" and "out-of-range" in r.getMessage()]
    assert bool(warned) is not quiet


@pytest.mark.parametrize("own_inputs", [False, True])
def test_an_fp32_layer_between_int8_layers_stays_fp32_only_with_its_own_dequantize(small_cnn, tmp_path, monkeypatch,
                                                                                  own_inputs):
    if not own_inputs:
        monkeypatch.setattr(autocomp.compress.quantize, "own_float_inputs", lambda path, keep_fp32: None)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = Quantize(bits=8, activation_bits=8, activation_layers={"fc1": 32})  # fc1 between int8 conv2 and fc2
    path = deploy(small_cnn.eval(), x[:1], spec, x.numpy(), tmp_path / "model.onnx")
    kernels = runtime.kernels(path, x[:1].numpy())
    # without its own DequantizeLinear, ONNX Runtime quantizes fc1's weight itself: a second QGemm, no fp32 Gemm
    assert (kernels.get("QGemm"), kernels.get("Gemm", 0) + kernels.get("FusedGemm", 0)) == ((1, 1) if own_inputs
                                                                                             else (2, 0))
    np.testing.assert_allclose(runtime.run(runtime.session(path), x.numpy()), small_cnn(x).detach().numpy(),
                               atol=0.1 * float(small_cnn(x).abs().max()))
