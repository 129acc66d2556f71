"""Post-training static int8 quantization of the ONNX artifact with ONNX Runtime (QDQ format).

Weights are int8 (symmetric, per tensor or per channel), activations uint8 (asymmetric, the x86
U8S8 kernels). The activation ranges come from autocomp's own calibrators (``calibrate.py``),
handed to ONNX Runtime as a calibration cache, so the deployed model uses the very ranges that
the recipe's calibration method defines.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from autocomp.compress.calibrate import CALIBRATORS

ACTIVATION_BITS = 8


def activation_batches(model_path: Path, x: np.ndarray, batch_size: int = 32) -> dict[str, list[torch.Tensor]]:
    """Every float tensor the model computes, batch by batch, from running it on ``x``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    floats = {v.name for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                              for node in model.graph.node for name in node.output
                              if name in floats and name not in known)
    names = [o.name for o in model.graph.output]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    batches: dict[str, list[torch.Tensor]] = {name: [] for name in [feed, *names]}
    for i in range(0, len(x), batch_size):
        batches[feed].append(torch.from_numpy(x[i : i + batch_size]))
        for name, value in zip(names, sess.run(names, {feed: x[i : i + batch_size]}), strict=True):
            batches[name].append(torch.from_numpy(value))
    return batches


def quantize_int8(fp32_path: Path, out_path: Path, calibration_x: np.ndarray,
                  calibration: str, per_channel: bool = False) -> Path:
    """Write the int8 QDQ model of ``fp32_path`` to ``out_path``, calibrated on ``calibration_x``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrator = CALIBRATORS.get(calibration, field="quantize.calibration")()
    with tempfile.TemporaryDirectory() as tmp:
        prepared, cache = Path(tmp) / "prepared.onnx", Path(tmp) / "ranges.json"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph optimisation (BN folding)
        ranges = {name: calibrator.range(batches, ACTIVATION_BITS, symmetric=False)
                  for name, batches in activation_batches(prepared, calibration_x).items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()
        }), cache)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared), str(out_path), None, calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    return out_path
