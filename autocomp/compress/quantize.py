"""Post-training static int8 quantization of the ONNX artifact with ONNX Runtime (QDQ format).

Weights are int8 (symmetric), activations uint8 (asymmetric, the x86 U8S8 kernels); activation
ranges come from the recipe's calibration method run on training data.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autocomp.registry import Registry


@dataclass(frozen=True)
class Calibrator:
    """An ONNX Runtime ``CalibrationMethod`` member and its extra options."""

    method: str
    options: dict = field(default_factory=dict)


CALIBRATORS: Registry[Calibrator] = Registry("calibration method")
CALIBRATORS.add("minmax", Calibrator("MinMax"), "min and max of each activation over the calibration set")
CALIBRATORS.add("moving_average", Calibrator("MinMax", {"CalibMovingAverage": True}),
                "exponential moving average of per-batch min and max (as in QAT observers)")
CALIBRATORS.add("percentile", Calibrator("Percentile", {"CalibPercentile": 99.99}),
                "99.99th percentile of the |activation| histogram: clips rare outliers")
CALIBRATORS.add("entropy", Calibrator("Entropy"),
                "range minimising KL divergence between fp32 and int8 histograms (TensorRT-style)")


class _Batches:
    """ONNX Runtime CalibrationDataReader over an in-memory array."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 32) -> None:
        self._feeds = iter([{input_name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_int8(fp32_path: Path, out_path: Path, calibration_x: np.ndarray,
                  calibration: str, per_channel: bool = False) -> Path:
    """Write the int8 QDQ model of ``fp32_path`` to ``out_path``, calibrated on ``calibration_x``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrator = CALIBRATORS.get(calibration, field="quantize.calibration")
    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph optimisation (BN folding)
    input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their histogram settings
        quantize_static(
            str(prepared), str(out_path), _Batches(input_name, calibration_x),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, calibrator.method),
            extra_options=dict(calibrator.options),
        )
    prepared.unlink()
    return out_path
