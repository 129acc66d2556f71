"""Weight storage of the ONNX artifact: low-bit, shared or sparse weights, decoded once at load.

Each Conv/Gemm/MatMul weight is stored as codes in the smallest ONNX type that holds them (INT2:
four per byte; INT4: two per byte, also for 3 bits; INT8 for 5-7 bits; fp16 for 16 bits) plus what
turns codes back into the weight: a scale and zero point per tensor or per channel (linear grid), or
a 2^bits-entry codebook (k-means weight sharing, Han et al., Deep Compression, ICLR 2016). A weight
with zeros (unstructured pruning), the int8 layers' symmetric weights too, is stored as a bitmask
and its non-zero codes whenever that is smaller. The decoding nodes (Cast, Sub, Mul, Gather, ...)
read constants only, so ONNX Runtime folds them once when the session loads and then runs its
fp32 kernels: the file shrinks, the speed is fp32's. Linear layers with dense 3-4-bit weights
instead keep them packed in memory and run ONNX Runtime's 4-bit kernel (MatMulNBits, fp32
activations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autocomp.compress.calibrate import qrange, scale_zero_point, weight_range

WEIGHTED = ("Conv", "Gemm", "MatMul")
NBITS = (3, 4)  # weight widths that run on MatMulNBits (its 2- and 8-bit fp32 paths are slower than fp32)
NBITS_MAX_BLOCK = 256  # the largest block ONNX Runtime's CPU MatMulNBits takes
DECODER_BYTES = 1000  # about what a sparse decoder's nodes add to the file


def container_bits(bits: int) -> int:
    """The storage width of ``bits``-bit codes: 2, 4 or 8 (integers), or 16/32 (floats)."""
    return bits if bits >= 16 else 2 if bits <= 2 else 4 if bits <= 4 else 8


def _stored(values: np.ndarray, bits: int, signed: bool, name: str):
    """An ONNX tensor of ``values`` in the container type of ``bits`` (bit-packed in raw data)."""
    import ml_dtypes
    from onnx import numpy_helper

    if bits >= 16:
        return numpy_helper.from_array(np.asarray(values, np.float16 if bits == 16 else np.float32), name)
    kind = f"{'' if signed else 'u'}int{container_bits(bits)}"
    dtype = getattr(ml_dtypes, kind, None) or np.dtype(kind)
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def _channel_axis(node) -> int:
    """Output-channel axis of the weight: 0 for Conv and Gemm(transB=1), 1 for MatMul/Gemm(transB=0)."""
    if node.op_type == "Conv":
        return 0
    return 0 if node.op_type == "Gemm" and _attr(node, "transB") else 1


def input_channels(node, weight_dims) -> int:
    """Input channels of a Conv/Gemm/MatMul ``node`` whose weight has shape ``weight_dims``."""
    if node.op_type == "Conv":
        return weight_dims[1] * _attr(node, "group", 1)
    return weight_dims[1] if node.op_type == "Gemm" and _attr(node, "transB") else weight_dims[0]


def _attr(node, name: str, default: float = 0):
    return next((a.f if a.type == a.FLOAT else a.i for a in node.attribute if a.name == name), default)


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


@dataclass
class Encoded:
    """A weight as stored: ``codes`` shaped like it (``bits`` wide, ``signed``), ``fill`` the code a
    pruned weight reads, and the ``constants`` and ``nodes`` that turn the fp32 codes tensor
    ``<name>_codes`` into the weight ``<name>``."""

    codes: np.ndarray
    bits: int
    signed: bool
    suffix: str
    fill: float = 0.0
    constants: list = field(default_factory=list)
    nodes: list = field(default_factory=list)


def _encode(name: str, w: np.ndarray, bits: int, node, symmetric: bool, per_channel: bool, kmeans: bool,
            mask: np.ndarray | None) -> Encoded:
    """``w`` at ``bits`` (32/16 float, 2-8 linear grid or k-means); ``mask`` (kept weights) when stored sparsely."""
    from onnx import TensorProto, helper, numpy_helper

    codes = f"{name}_codes"
    if bits >= 16:
        suffix = "fp16" if bits == 16 else "fp32"
        return Encoded(w, bits, True, suffix, nodes=[helper.make_node("Identity", [codes], [name])])
    if kmeans:  # Deep Compression clusters the weights that survived pruning; pruned ones read an extra 0.0
        codebook, idx = kmeans_codebook(w if mask is None else w[mask], bits)
        if mask is not None:
            idx, kept = np.zeros(w.shape, np.int32), idx
            idx[mask] = kept
            codebook = np.append(codebook, np.float32(0.0))
        return Encoded(idx, bits, False, "idx", fill=float(len(codebook) - 1),
                       constants=[numpy_helper.from_array(codebook, f"{name}_codebook")],
                       nodes=[helper.make_node("Cast", [codes], [f"{name}_idx64"], to=TensorProto.INT64),
                              helper.make_node("Gather", [f"{name}_codebook", f"{name}_idx64"], [name], axis=0)])
    axis = _channel_axis(node)
    q, scale, zero_point = _linear_codes(w, axis, bits, symmetric, per_channel)
    shape = [1] * w.ndim
    shape[axis] = -1 if per_channel else 1
    zero = f"{name}_zp" if mask is None else f"{name}_zp_kept"  # pruned weights read code 0: no zero point
    nodes = [] if mask is None else [helper.make_node("Mul", [f"{name}_zp", f"{name}_mask"], [zero])]
    return Encoded(q, bits, symmetric, "q", constants=[
        numpy_helper.from_array(scale.reshape(shape), f"{name}_scale"),
        numpy_helper.from_array(zero_point.astype(np.float32).reshape(shape), f"{name}_zp")], nodes=[
        *nodes, helper.make_node("Sub", [codes, zero], [f"{name}_centred"]),
        helper.make_node("Mul", [f"{name}_centred", f"{name}_scale"], [name])])


def _stored_nodes(name: str, enc: Encoded, mask: np.ndarray | None) -> tuple[list, list]:
    """Initializers and nodes that rebuild the fp32 codes ``<name>_codes`` (and, when sparse, the fp32
    ``<name>_mask``) from storage: the codes as they are, or a bitmask and the kept codes.

    Sparse: codes = Reshape(Gather([fill, kept...], mask * CumSum(mask)), shape), the mask unpacked from
    bytes by BitShift/BitwiseAnd.
    """
    from onnx import TensorProto, helper, numpy_helper

    def n(suffix: str) -> str:
        return f"{name}_{suffix}"

    if mask is None:
        return ([_stored(enc.codes, enc.bits, enc.signed, n(enc.suffix))],
                [helper.make_node("Cast", [n(enc.suffix)], [n("codes")], to=TensorProto.FLOAT)])
    flat = mask.ravel()
    constants = [
        numpy_helper.from_array(np.packbits(flat, bitorder="little"), n("bits")),
        _stored(enc.codes.ravel()[flat], enc.bits, enc.signed, n(f"{enc.suffix}_kept")),
        numpy_helper.from_array(np.array([enc.fill], np.float32), n("fill")),
        numpy_helper.from_array(np.array([flat.size], np.int64), n("size")),
        numpy_helper.from_array(np.array(mask.shape, np.int64), n("shape")),
    ]
    nodes = [
        helper.make_node("Unsqueeze", [n("bits"), "sparse_minus_one"], [n("bytes")]),  # (B, 1)
        helper.make_node("BitShift", [n("bytes"), "sparse_bit_shifts"], [n("shifted")], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [n("shifted"), "sparse_one"], [n("bitmat")]),  # (B, 8)
        helper.make_node("Reshape", [n("bitmat"), "sparse_minus_one"], [n("bitflat")]),
        helper.make_node("Slice", [n("bitflat"), "sparse_zero", n("size")], [n("maskbits")]),
        helper.make_node("Cast", [n("maskbits")], [n("mask64")], to=TensorProto.INT64),
        helper.make_node("CumSum", [n("mask64"), "sparse_zero"], [n("rank")]),
        helper.make_node("Mul", [n("rank"), n("mask64")], [n("index")]),  # 0 picks the fill
        helper.make_node("Cast", [n(f"{enc.suffix}_kept")], [n("kept")], to=TensorProto.FLOAT),
        helper.make_node("Concat", [n("fill"), n("kept")], [n("table")], axis=0),
        helper.make_node("Gather", [n("table"), n("index")], [n("flatcodes")], axis=0),
        helper.make_node("Reshape", [n("flatcodes"), n("shape")], [n("codes")]),
        helper.make_node("Cast", [n("mask64")], [n("flatmask")], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [n("flatmask"), n("shape")], [n("mask")]),
    ]
    return constants, nodes


def _sparse_constants() -> list:
    """The constants every sparse decoder shares."""
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.arange(8, dtype=np.uint8), "sparse_bit_shifts"),
            numpy_helper.from_array(np.uint8(1), "sparse_one"),
            numpy_helper.from_array(np.array([-1], np.int64), "sparse_minus_one"),
            numpy_helper.from_array(np.array([0], np.int64), "sparse_zero")]


def _sparse_wins(mask: np.ndarray, bits: int) -> bool:
    """A bitmask and the kept codes take fewer bytes than all the codes."""
    stored = container_bits(bits)
    return math.ceil(mask.size / 8) + mask.sum() * stored / 8 + DECODER_BYTES < mask.size * stored / 8


def stored_bytes(model: torch.nn.Module, bits_of: Callable[[str], int], per_channel: bool, symmetric: bool,
                 sparse: bool = False) -> int:
    """About the bytes the artifact of ``model`` stores with each layer's weights at ``bits_of(layer)`` bits, without
    writing it: every Conv/Linear weight in its container width (as a bitmask and its kept codes where ``sparse``
    and smaller),
    with its scales and zero points, every other parameter in fp32. The ONNX graph itself is left out. The cheap
    rung ranks candidates by it (``autocomp.proxy``); a trial's size is its file's."""
    total = 0
    weights = set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = module.weight.detach()
        weights.add(name)
        bits = bits_of(name)
        stored = container_bits(bits)
        codes = w.numel() * stored / 8
        if sparse:
            mask = (w != 0).numpy()
            if _sparse_wins(mask, bits):
                codes = math.ceil(mask.size / 8) + mask.sum() * stored / 8 + DECODER_BYTES
        channels = w.shape[0] if per_channel else 1
        grid = channels * (4 + (0 if symmetric else 1)) if bits <= 8 else 0
        total += int(codes) + grid
    counted = {f"{name}.{suffix}" for name in weights for suffix in ("weight", "parametrizations.weight.original")}
    return total + 4 * sum(p.numel() for n, p in model.named_parameters() if n not in counted)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes packed two to a byte along the last axis, the first in the low nibble (odd length: padded)."""
    codes = np.asarray(codes, np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _nbits_node(node, w: np.ndarray, bits: int, symmetric: bool, per_channel: bool, inits: dict):
    """The MatMulNBits (4-bit) node that replaces a Linear ``node`` (Gemm A.W^T + C, or MatMul A.W), and its
    constants: the codes of ``w`` on the recipe's grid, in blocks along K, each block repeating its row's scale
    and zero point. None when ``node`` is not a plain Linear (transposed A, alpha, beta, a broadcast bias)."""
    from onnx import helper, numpy_helper

    gemm = node.op_type == "Gemm"
    bias = node.input[2] if gemm and len(node.input) > 2 else ""
    weight = w if gemm and _attr(node, "transB") else w.T  # (N, K)
    n_out, k = weight.shape
    if gemm and (_attr(node, "transA") or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
        return None
    if bias and (bias not in inits or tuple(inits[bias].dims) != (n_out,)):
        return None
    q, scale, zero_point = _linear_codes(weight, 0, bits, symmetric, per_channel)
    offset = 8 if symmetric else 0  # the kernel's codes are unsigned
    block = min(NBITS_MAX_BLOCK, max(16, 1 << (k - 1).bit_length()))
    blocks = -(-k // block)
    zero = np.broadcast_to(zero_point.reshape(-1, 1) + offset, (n_out, blocks))
    codes = np.repeat(zero[:, :1], blocks * block, axis=1)  # the padding past K decodes to 0
    codes[:, :k] = q + offset
    name = node.input[1]
    constants = [
        numpy_helper.from_array(_nibbles(codes.reshape(n_out, blocks, block)), f"{name}_nbits"),
        numpy_helper.from_array(np.repeat(np.broadcast_to(scale.reshape(-1, 1), (n_out, 1)), blocks, 1),
                                f"{name}_nbits_scale"),
        numpy_helper.from_array(_nibbles(zero), f"{name}_nbits_zp"),  # packed: float zero points are 3x slower
    ]
    return constants, helper.make_node(
        "MatMulNBits", [node.input[0], f"{name}_nbits", f"{name}_nbits_scale", f"{name}_nbits_zp", "", bias],
        list(node.output), name=node.name, domain="com.microsoft", K=k, N=n_out, bits=4, block_size=block)


def _int8_weights(model, inits: dict) -> dict[str, np.ndarray]:
    """The int8 weight initializers that a DequantizeLinear with zero point 0 reads (static int8 layers)."""
    from onnx import TensorProto, numpy_helper

    weights = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = inits[node.input[0]]
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            if codes.data_type == TensorProto.INT8 and (zero is None or not numpy_helper.to_array(zero).any()):
                weights[node.input[0]] = numpy_helper.to_array(codes)
    return weights


@dataclass
class _Rewrite:
    """What packing does to a graph: ``constants`` added, decoding nodes put in ``front`` of it, and nodes
    ``replaced`` (by ``id``) with the kernel that runs on the packed weight."""

    constants: list = field(default_factory=list)
    front: list = field(default_factory=list)
    replaced: dict[int, object] = field(default_factory=dict)

    def store(self, constants: list, decoder: list) -> None:
        self.constants += constants
        self.front += decoder


def pack_weights(prepared: Path, out_path: Path, bits: dict[str, int], symmetric: bool = True,
                 per_channel: bool = True, kmeans: bool = False, sparse: bool = False) -> Path:
    """Rewrite the weights of ``prepared`` (a BN-folded fp32 ONNX model, maybe with static int8 layers): each
    fp32 initializer named in ``bits`` at its own width (32 keeps fp32); ``sparse``: weights with zeros, the
    int8 layers' symmetric weights too, stored sparsely where that is smaller."""
    import onnx

    model = _for_opset(onnx.load(str(prepared)), min(bits.values(), default=32))
    nodes = weight_names(model)
    inits = {i.name: i for i in model.graph.initializer}
    rewrite = _Rewrite()
    for name, b in bits.items():
        _pack_weight(name, b, nodes[name], inits, rewrite, symmetric, per_channel, kmeans, sparse)
    if sparse:
        _pack_int8_weights(model, inits, rewrite)
    _rewritten(model, inits, rewrite)
    onnx.save(model, str(out_path))
    return out_path


def _for_opset(model, lowest_bits: int):
    """``model`` at the opset whose types hold ``lowest_bits``-bit codes: 21 for INT4, 25 for INT2."""
    from onnx import version_converter

    if lowest_bits > 8:
        return model
    model = version_converter.convert_version(model, 25 if lowest_bits <= 2 else 21)
    model.ir_version = min(model.ir_version, 13)  # the newest ONNX Runtime reads
    return model


def _pack_weight(name: str, bits: int, node, inits: dict, rewrite: _Rewrite, symmetric: bool, per_channel: bool,
                 kmeans: bool, sparse: bool) -> None:
    """Store fp32 weight ``name`` at ``bits``: on MatMulNBits where it runs there (dense 3-4-bit Linear weights),
    else as codes and their decoder, sparsely where that is smaller; a dense fp32 weight stays."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(inits[name])
    mask = (w != 0) if sparse and _sparse_wins(w != 0, bits) else None
    if bits == 32 and mask is None:
        return
    del inits[name]
    if mask is None and bits in NBITS and not kmeans and node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        nbits = _nbits_node(node, w, bits, symmetric, per_channel, inits)
        if nbits is not None:
            constants, kernel = nbits
            rewrite.constants += constants
            rewrite.replaced[id(node)] = kernel
            return
    enc = _encode(name, w, bits, node, symmetric, per_channel, kmeans, mask)
    constants, decoder = _stored_nodes(name, enc, mask)
    rewrite.store([*constants, *enc.constants], [*decoder, *enc.nodes])


def _pack_int8_weights(model, inits: dict, rewrite: _Rewrite) -> None:
    """The int8 kernels' weights (zero point 0) with zeros, stored as a bitmask and their kept codes where that is
    smaller."""
    from onnx import TensorProto, helper

    for name, codes in _int8_weights(model, inits).items():
        if _sparse_wins(codes != 0, 8):
            del inits[name]
            constants, decoder = _stored_nodes(name, Encoded(codes, 8, True, "int8"), codes != 0)
            rewrite.store(constants, [*decoder, helper.make_node("Cast", [f"{name}_codes"], [name],
                                                                 to=TensorProto.INT8)])


def _rewritten(model, inits: dict, rewrite: _Rewrite) -> None:
    """Put ``rewrite`` into ``model``: the kept initializers and the new constants, the decoders before the graph's
    own nodes, replaced nodes swapped, the constants and domain the decoders and kernels need."""
    from onnx import helper

    if any(node.op_type == "BitShift" for node in rewrite.front):
        rewrite.constants += _sparse_constants()
    if rewrite.replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph = [rewrite.replaced.get(id(node), node) for node in model.graph.node]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*inits.values(), *rewrite.constants])
    del model.graph.node[:]
    model.graph.node.extend([*rewrite.front, *graph])
