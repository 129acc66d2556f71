"""Every patch autocomp makes to what ONNX Runtime's quantization tools do, in one place.

Each function names the ONNX Runtime behaviour it works around; ``tests/compress/test_ort_workarounds.py`` holds,
for each, a test that shows the behaviour on the installed ONNX Runtime and fails once ONNX Runtime no longer
behaves so: then the workaround can go.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from autocomp import runtime
from autocomp.compress.pack import input_channels, weight_names

FUSED = "ConvBnFusion_W_"  # ONNX Runtime's name for a Conv weight with its BatchNorm folded in


def pre_process(source: Path, target: Path) -> None:
    """``quant_pre_process`` (shape inference, then graph optimisation: BatchNorm folded into Conv) of ``source``
    into ``target``, its Conv weights under their layers' names.

    Works around: (1) ONNX Runtime's symbolic shape inference fails (an AssertionError) on the dynamic Reshape of
    ``nn.MultiheadAttention``'s export, where ONNX's own shape inference succeeds; (2) a Conv weight with its
    BatchNorm folded in is renamed ``ConvBnFusion_W_<name>``, but recipes name layers, and the weights are found by
    those names, so the original names come back.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
    except AssertionError:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    restore_weight_names(target)


def restore_weight_names(path: Path) -> None:
    """``conv1.weight``, not ``ConvBnFusion_W_conv1.weight`` (``pre_process``)."""
    import onnx

    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer}
    renamed = {n: n.removeprefix(FUSED) for n in names if n.startswith(FUSED) and n.removeprefix(FUSED) not in names}
    if renamed:
        runtime.rename_initializers(model, renamed)
        onnx.save(model, str(path))


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Keep ONNX Runtime's quantizer off the user's terminal while it runs.

    Works around: ``quantize_static`` prints to stdout, and warns on the *root* logger ("Axis 1 is out-of-range for
    weight 'norm.weight' with rank 1" for a LayerNorm's weight, which it then quantizes per tensor), so the warning
    reaches every user of the root logger.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def own_float_inputs(path: Path, keep_fp32: tuple[str, ...]) -> None:
    """Give each fp32 layer (its weight named in ``keep_fp32``) whose input is dequantized a DequantizeLinear of its
    own, with its scale and zero point repeated per channel: the same floats.

    Works around: when a session loads, ONNX Runtime's WeightBiasQuantization pass quantizes the float weight of a
    Conv/Gemm whose input comes from a per-tensor DequantizeLinear and whose output goes on to a QuantizeLinear, so
    a layer ``quantize_static`` was told to leave in fp32 (``nodes_to_exclude``) between int8 layers would run on
    int8 kernels after all. A per-channel DequantizeLinear leaves the layer, and the int8 layer before it, as
    planned.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    nodes = list(model.graph.node)
    for name, node in weight_names(model).items():
        dq = producer.get(node.input[0])
        if name not in keep_fp32 or dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        channels = input_channels(node, inits[name].dims)
        scale, zero_point = (numpy_helper.to_array(inits[i]) for i in dq.input[1:3])
        own = f"{node.name}_input"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.full(channels, scale, scale.dtype), f"{own}_scale"),
            numpy_helper.from_array(np.full(channels, zero_point, zero_point.dtype), f"{own}_zero_point")])
        nodes.insert(nodes.index(node), helper.make_node(
            "DequantizeLinear", [dq.input[0], f"{own}_scale", f"{own}_zero_point"], [f"{own}_dequantized"],
            name=f"{own}_DequantizeLinear", axis=1 if node.op_type == "Conv" else -1))
        node.input[0] = f"{own}_dequantized"
    read = {i for node in nodes for i in node.input} | {o.name for o in model.graph.output}
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n.op_type != "DequantizeLinear" or read & set(n.output))
    onnx.save(model, str(path))
