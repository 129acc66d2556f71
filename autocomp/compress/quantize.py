"""The deployable artifact of a Quantize spec: fp32, weight-only packed (``pack.py``), or static int8.

Static int8 uses ONNX Runtime's QDQ format: weights int8 (per tensor or per channel),
activations uint8 (asymmetric, the x86 U8S8 kernels). The activation ranges come from
autocomp's own calibrators (``calibrate.py``), handed to ONNX Runtime as a calibration cache, so
the deployed model uses the very ranges that the recipe's calibration method defines.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp import runtime
from autocomp.compress.calibrate import CALIBRATORS
from autocomp.compress.ort_workarounds import own_float_inputs, pre_process, quiet_quantizer
from autocomp.compress.pack import pack_weights, weight_names
from autocomp.recipe import Quantize

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


def quantize_int8(prepared: Path, out_path: Path, calibration_x: np.ndarray, calibration: str,
                  per_channel: bool = False, symmetric: bool = True, keep_fp32: tuple[str, ...] = ()) -> Path:
    """Write the int8 QDQ model of ``prepared`` (BN-folded fp32) to ``out_path``, calibrated on
    ``calibration_x``; the layers reading the weights named in ``keep_fp32`` stay fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    calibrator = CALIBRATORS.get(calibration, field="quantize.calibration")()
    ranges = {name: calibrator.range(batches, ACTIVATION_BITS, symmetric=False)
              for name, batches in activation_batches(prepared, calibration_x).items()}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()
        }), cache)
        with quiet_quantizer():
            quantize_static(
                str(prepared), str(out_path), None, calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, extra_options={"WeightSymmetric": symmetric},
                nodes_to_exclude=[node.name for name, node in weight_names(onnx.load(str(prepared))).items()
                                  if name in keep_fp32],
            )
    own_float_inputs(out_path, keep_fp32)
    return out_path


def deploy(model: nn.Module, example_input: torch.Tensor, spec: Quantize, calibration_x: np.ndarray,
           path: Path, sparse: bool = False) -> Path:
    """Write the deployable ONNX artifact of ``model`` as ``spec`` quantizes it.

    Layers with 8-bit activations run on int8 kernels (static int8 QDQ); the others keep fp32
    activations, their weights stored at their own width by ``pack.py``. ``sparse``: weights with
    zeros (unstructured pruning) outside the int8 layers are stored as a bitmask and their kept codes.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        runtime.export_onnx(model, example_input, fp32)
        if spec.bits == 32 and not spec.layers and spec.activation_bits == 32 and not spec.activation_layers:
            prepared = fp32  # nothing quantized: the plain export (weights may still be stored sparsely)
        else:
            pre_process(fp32, prepared)  # shape inference + graph optimisation (BN folding)
        layers = {name: name.removesuffix(".weight") for name in weight_names(onnx.load(str(prepared)))}
        int8_layers = [name for name, layer in layers.items() if spec.activation_bits_of(layer) == 8]
        if int8_layers:
            prepared = quantize_int8(prepared, int8, calibration_x, spec.calibration, spec.per_channel,
                                     spec.symmetric, keep_fp32=tuple(set(layers) - set(int8_layers)))
        bits = {name: spec.bits_of(layer) for name, layer in layers.items() if name not in int8_layers}
        return pack_weights(prepared, path, bits, spec.symmetric, spec.per_channel, spec.kmeans, sparse=sparse)
