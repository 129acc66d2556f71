"""Weight-only quantization of the ONNX artifact: low-bit weights stored packed, dequantized to fp32.

Weights of ``bits`` < 8 are stored in the smallest ONNX integer type that holds them (INT2: four
per byte; INT4: two per byte, also for 3 bits; INT8 for 5-7 bits) and turned back into fp32 by a
DequantizeLinear in front of each layer; ``bits`` 16 stores fp16 and casts. ONNX Runtime then runs
fp32 kernels: the file shrinks, the speed is what fp32 gives. K-means weight sharing (Han et al.,
Deep Compression, ICLR 2016) stores a 2^bits-entry fp32 codebook per layer and packed indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from autocomp.compress.calibrate import qrange, scale_zero_point, weight_range

WEIGHTED = ("Conv", "Gemm", "MatMul")


def container_bits(bits: int) -> int:
    """The ONNX integer width that stores ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _packed(values: np.ndarray, bits: int, signed: bool, name: str):
    """An ONNX tensor of integer ``values`` in the smallest container type, bit-packed in raw data."""
    import ml_dtypes
    from onnx import numpy_helper

    kind = f"{'' if signed else 'u'}int{container_bits(bits)}"
    dtype = getattr(ml_dtypes, kind, None) or np.dtype(kind)
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def _channel_axis(node) -> int:
    """Output-channel axis of the weight: 0 for Conv and Gemm(transB=1), 1 for MatMul/Gemm(transB=0)."""
    if node.op_type == "Conv":
        return 0
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if node.op_type == "Gemm" and trans_b else 1


def _linear_codes(w: np.ndarray, axis: int, bits: int, symmetric: bool, per_channel: bool):
    """Integer codes, scales and zero points of ``w`` on its min-max b-bit grid."""
    moved = np.moveaxis(w, axis, 0)  # (C, ...): output channels first
    lo, hi = weight_range(torch.from_numpy(moved.copy()), per_channel, symmetric)
    scale, zero_point = scale_zero_point(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    shape = (-1,) + (1,) * (w.ndim - 1)  # broadcasts a per-channel (or scalar) parameter over ``moved``
    codes = np.clip(np.round(moved / scale.numpy().reshape(shape)) + zero_point.numpy().reshape(shape), qmin, qmax)
    return np.moveaxis(codes, 0, axis).astype(np.int32), scale.numpy().astype(np.float32), zero_point.numpy()


def kmeans_codebook(w: np.ndarray, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the weights into 2^bits shared values: (codebook (2^b,), indices like w)."""
    from sklearn.cluster import KMeans

    flat = w.reshape(-1, 1).astype(np.float64)
    k = min(2**bits, len(np.unique(flat)))
    init = np.linspace(flat.min(), flat.max(), k).reshape(-1, 1)  # linear init, as in Deep Compression
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=50, random_state=seed).fit(flat)
    return km.cluster_centers_.ravel().astype(np.float32), km.labels_.reshape(w.shape).astype(np.int32)


def weight_names(model) -> dict[str, object]:
    """fp32 weight initializer name -> the Conv/Gemm/MatMul node that reads it."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[1]: n for n in model.graph.node
            if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits
            and inits[n.input[1]].data_type == TensorProto.FLOAT}


def pack_weights(prepared: Path, out_path: Path, bits: dict[str, int], symmetric: bool = True,
                 per_channel: bool = True, kmeans: bool = False) -> Path:
    """Rewrite the weights of ``prepared`` (a BN-folded fp32 ONNX model) packed, each initializer
    named in ``bits`` at its own width (32 leaves it as it is)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    model = onnx.load(str(prepared))
    widths = [b for b in bits.values() if b <= 8]
    if widths:
        model = version_converter.convert_version(model, 25 if min(widths) <= 2 else 21)
        model.ir_version = min(model.ir_version, 13)  # the newest ONNX Runtime reads
    nodes = weight_names(model)
    inits = {i.name: i for i in model.graph.initializer}
    front, keep = [], []
    for name, b in bits.items():
        if b == 32:
            continue
        w = numpy_helper.to_array(inits.pop(name))
        if b == 16:
            keep.append(numpy_helper.from_array(w.astype(np.float16), f"{name}_fp16"))
            front.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT))
        elif kmeans:
            codebook, idx = kmeans_codebook(w, b)
            keep += [numpy_helper.from_array(codebook, f"{name}_codebook"), _packed(idx, b, False, f"{name}_idx")]
            front += [helper.make_node("Cast", [f"{name}_idx"], [f"{name}_idx64"], to=TensorProto.INT64),
                      helper.make_node("Gather", [f"{name}_codebook", f"{name}_idx64"], [name], axis=0)]
        else:
            axis = _channel_axis(nodes[name])
            codes, scale, zero_point = _linear_codes(w, axis, b, symmetric, per_channel)
            keep += [_packed(codes, b, symmetric, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale"),
                     _packed(zero_point.reshape(scale.shape), b, symmetric, f"{name}_zp")]
            front.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [name],
                                          **({"axis": axis} if per_channel else {})))
    _rewrite(model, [*inits.values(), *keep], front)
    onnx.save(model, str(out_path))
    return out_path


def _rewrite(model, initializers: list, front: list) -> None:
    """Replace the graph's initializers, and put ``front`` (nodes that build weights) first."""
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    nodes = [*front, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def sparse_encode(path: Path, out_path: Path, min_zeros: float = 0.05) -> Path:
    """Store each Conv/Gemm/MatMul weight that is at least ``min_zeros`` zeros as a packed bitmask
    (one bit per weight) and its non-zero values; the graph rebuilds the dense weight.

    weight = Reshape(Gather([0, values...], mask * CumSum(mask)), shape), with the mask unpacked
    from bytes by BitShift/BitwiseAnd. Every input is constant, so ONNX Runtime folds it once when
    the session loads and runs the usual dense kernels: the file shrinks, the speed does not change.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    shifts = numpy_helper.from_array(np.arange(8, dtype=np.uint8), "sparse_bit_shifts")
    front, keep, used = [], [], False
    for name in sorted(weight_names(model)):
        w = numpy_helper.to_array(inits[name])
        if (w == 0).mean() < min_zeros:
            continue
        used = True
        del inits[name]
        mask = (w != 0).ravel()
        keep += [numpy_helper.from_array(np.packbits(mask, bitorder="little"), f"{name}_bits"),
                 numpy_helper.from_array(np.concatenate([[0.0], w.ravel()[mask]]).astype(np.float32), f"{name}_nz"),
                 numpy_helper.from_array(np.array([w.size], np.int64), f"{name}_size"),
                 numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}_shape")]
        front += _sparse_decoder(name)
    if used:
        keep += [shifts, numpy_helper.from_array(np.array([-1], np.int64), "sparse_axis_last"),
                 numpy_helper.from_array(np.uint8(1), "sparse_one"),
                 numpy_helper.from_array(np.array([-1], np.int64), "sparse_flat"),
                 numpy_helper.from_array(np.array([0], np.int64), "sparse_zero")]
    _rewrite(model, [*inits.values(), *keep], front)
    onnx.save(model, str(out_path))
    return out_path


def _sparse_decoder(name: str) -> list:
    """Nodes that rebuild dense ``name`` from ``name``_bits, _nz, _size and _shape."""
    from onnx import TensorProto, helper

    def n(suffix: str) -> str:
        return f"{name}_{suffix}"

    return [
        helper.make_node("Unsqueeze", [n("bits"), "sparse_axis_last"], [n("bytes")]),  # (B, 1)
        helper.make_node("BitShift", [n("bytes"), "sparse_bit_shifts"], [n("shifted")], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [n("shifted"), "sparse_one"], [n("bitmat")]),  # (B, 8)
        helper.make_node("Reshape", [n("bitmat"), "sparse_flat"], [n("bitflat")]),
        helper.make_node("Slice", [n("bitflat"), "sparse_zero", n("size")], [n("maskbits")]),
        helper.make_node("Cast", [n("maskbits")], [n("mask")], to=TensorProto.INT64),
        helper.make_node("CumSum", [n("mask"), "sparse_zero"], [n("rank")]),
        helper.make_node("Mul", [n("rank"), n("mask")], [n("index")]),  # 0 picks the leading 0.0
        helper.make_node("Gather", [n("nz"), n("index")], [n("dense")], axis=0),
        helper.make_node("Reshape", [n("dense"), n("shape")], [name]),
    ]
