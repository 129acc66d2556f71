"""The deployable artifact: export to ONNX, and load it back into an ONNX Runtime session."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "input", "logits"


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Export ``model`` (eval mode, dynamic batch) as one self-contained ONNX file.

    The TorchScript exporter first: on this machine it takes 0.02-0.07 s for the built-in teachers, where the
    ``torch.export``-based one takes 1.6-3.3 s, a third of a small trial. A model it cannot trace (or a torch
    without it) goes through the ``torch.export``-based exporter. BatchNorm is not folded at export (so every
    layer's weight keeps its name); ONNX Runtime folds it when the session loads. A Linear layer applied to
    (batch, tokens, features) exports as a MatMul whose weight the exporter leaves unnamed (``onnx::MatMul_7``,
    the weight transposed): it gets its layer's name back (``_name_matmul_weights``), so that recipes, per-layer
    quantization and the kernel report find it.
    """
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" etc.
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(model, (example_input,), str(path), dynamo=False, opset_version=18,
                              training=torch.onnx.TrainingMode.PRESERVE,  # no BatchNorm folding: names kept
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            _name_matmul_weights(path, {n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        except Exception:  # noqa: BLE001 - any tracing failure: the other exporter decides
            torch.onnx.export(model, (example_input,), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT], output_names=[OUTPUT], verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


def _name_matmul_weights(path: Path, linears: set[str]) -> None:
    """Name each unnamed MatMul weight after the Linear layer whose scope the node carries: the node
    ``/encoder/layers.0/linear1/MatMul`` reads ``encoder.layers.0.linear1.weight`` (transposed)."""
    import onnx

    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in names and node.input[1].startswith("onnx::"):
            readers.setdefault(node.input[1], set()).add(".".join(node.name.strip("/").split("/")[:-1]))
    renamed = {old: f"{layer}.weight" for old, (layer, *more) in ((o, sorted(r)) for o, r in readers.items())
               if not more and layer in linears and f"{layer}.weight" not in names}
    if renamed:
        rename_initializers(model, renamed)
        onnx.save(model, str(path))


def rename_initializers(model, renamed: dict[str, str]) -> None:
    """Rename the initializers of the ONNX ``model`` that ``renamed`` maps, and every node input reading them."""
    for init in model.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]


def session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernels(path: Path, example_input: np.ndarray, threads: int = 1) -> dict[str, int]:
    """Which ONNX Runtime kernels one inference really executes, with their counts, read from
    the runtime's own profile (``QLinearConv`` is int8, ``FusedConv`` fp32, ...)."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = threads, 3
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: example_input})
        events = json.loads(Path(sess.end_profiling()).read_text())
    counts: dict[str, int] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def layer_kernels(path: Path) -> dict[str, str]:
    """Which ONNX Runtime kernel computes each Conv/Linear layer (``QLinearConv`` int8, ``FusedConv`` fp32,
    ``MatMulNBits`` 4-bit, ...), read from the graph the runtime builds from the artifact: its graph
    optimisations up to fusion, before the CPU layout transform (which renames the weights)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    layers: dict[str, str] = {}
    for node in graph.node:  # in order: a weight's decoding nodes come before the layer that reads it
        for name in node.input:
            layer, found, _ = name.rpartition(".weight")
            if found:
                layers[layer] = node.op_type
    return layers


INT8_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                          "DynamicQuantizeMatMul"})  # ONNX Runtime's CPU kernels that compute in int8


def fp32_fallbacks(layer_kernels: dict[str, str], asked: list[str]) -> dict[str, str]:
    """Of the layers ``asked`` to run on int8 kernels, those ONNX Runtime computes otherwise, each with why."""
    return {layer: f"ONNX Runtime computes it with {layer_kernels[layer]}, not an int8 kernel"
            for layer in asked if layer in layer_kernels and layer_kernels[layer] not in INT8_KERNELS}


def run(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Outputs of the artifact on ``x``, in batches."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])
