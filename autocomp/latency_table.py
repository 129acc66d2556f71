"""Predicted latency from a per-layer lookup table, for the cheap rung of a search (ARCHITECTURE.md, "Two rungs").

The approach of ProxylessNAS (Cai et al., ICLR 2019), HAQ (Wang et al., CVPR 2019) and NetAdapt (Yang et al., ECCV
2018): a model's latency is predicted as a fixed cost per inference plus the sum of its layers' own latencies, each
looked up by the layer's **geometry** (op, input shape at batch 1, output channels, kernel, stride, padding,
dilation, groups, bias, int8 or fp32), not by its name, so one table serves a teacher, its pruned variants and new
student networks. A prediction ranks candidates; it never stands in a reported latency (ARCHITECTURE.md, "Honest
numbers").

**What an entry times.** Small graphs, deployed by ``autocomp.compress.quantize.deploy`` (the path a trial's
artifact takes: fp32, or static int8 calibrated on random inputs) and timed in ONNX Runtime at batch 1
(``time_onnx``). A layer timed alone would carry what a model runs once, not once per layer: the per-call overhead
(about 6-10 us here), and for int8 the QuantizeLinear of its input, the layout Transposes around a QLinearConv and
the DequantizeLinear of its output (as much again as a small QLinearConv: digits' int8 teacher read 1.8x its real
latency). So each layer is timed behind its **stem**, the cheapest layer that maps its input to itself in the same
kernels and layout (a depthwise 1x1 convolution before a Conv, a per-feature scale before a Linear), and its entry
is the time it adds: ``t(stem -> layer) - t(stem)``. The fixed cost of a model is ``t(stem)`` of its first layer
alone: the call, the input and output conversions and a negligible depthwise layer. Every layer is followed by a
ReLU, as most layers of a CNN are (ONNX Runtime fuses it into FusedConv/QLinearConv: it costs next to nothing, and
the head's missing ReLU is noise). The graphs a prediction lacks are timed side by side with a fixed ``REFERENCE``
graph and scaled to the reference's time in the table, so entries timed minutes apart, under other load, share one
scale (``LatencyTable``).

**Hot and cold.** A layer timed over and over keeps its weights in the L2 cache; in a model whose weights do not fit
there, every layer reads them from the next level, each inference. So every graph is timed both ways: hot (runs
back to back) and cold (each run after writing a buffer twice the L2 cache), and a prediction reads the cold entries
when the model's weight bytes (int8 layers one byte a weight, fp32 four) exceed the L2 cache of a core
(``l2_bytes``), the hot ones otherwise. The digits and MNIST-1D fp32 teachers (3.2 and 2.9 MB of weights, L2 of 2
MB here) ran 1.6x and 1.3x their hot sums; their int8 artifacts (0.8 and 0.7 MB) ran at the hot sums.

**Channel buckets.** Channel counts (a Conv's input and output channels, a Linear's input and output features)
round up to ``bucket``: exact up to 8, then four steps per octave (10, 12, 14, 16, 20, 24, 28, 32, 40, 48, ...), so
a layer is looked up at most 25% wider per side, the widths pruning produces share entries, and the table holds at
most twelve widths per doubling: a step is taken one or eight lower where that keeps the count a multiple of 16, of
8 alone, or of neither, as the layer's is (38 channels are looked up as 39, not 40). ONNX Runtime runs an fp32
convolution in its blocked NCHWc layout only when its channels are multiples of the block (8 or 16, by CPU): the
digits teacher pruned 70% (channels 10, 19, 38, 77) ran slower than pruned 50% (16, 32, 64, 128). Spatial sizes
are exact (a task's input and the strides fix them).

**Left out.** Only Conv1d/Conv2d/Linear modules count: pooling, additions, BatchNorm (folded at load), activations,
reshapes and functional ops add nothing, nor does a Linear whose weight a parent module reads directly
(``nn.MultiheadAttention``'s projections). A model that switches between int8 and fp32 layers pays conversions at
each switch, which the table ignores; an int8 Linear's entry holds its own QuantizeLinear and DequantizeLinear (a
scale stem stays fp32). Weight-only packed layers are looked up as fp32 (their weights are decoded at load), the
3-4-bit Linear layers that run MatMulNBits too. A model larger than the last-level cache would read its weights
from memory, slower than the cold entries. Entries are kept in a JSON file per machine, kernels, ONNX Runtime
version and thread count (``table_path``), measured the first time a geometry is asked for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from autocomp import kernels
from autocomp.compress.quantize import deploy
from autocomp.features import LAYER_TYPES
from autocomp.onnx_timing import Timing, l2_bytes, time_onnx
from autocomp.recipe import Quantize
from autocomp.tasks.base import cache_dir, machine_cpu

SCHEMA_VERSION = 1
PROTOCOL = 1  # what an entry times (stem -> layer + ReLU, deploy, ``time_onnx``); another protocol: another file
EXACT_CHANNELS = 8  # channel counts up to this are looked up as they are
STEPS_PER_OCTAVE = 4
INT8 = Quantize(bits=8, activation_bits=8, per_channel=True)
FP32 = Quantize()
CALIBRATION_SAMPLES = 16
# times ONNX files side by side: [(file, its input at batch 1)] -> a Timing of each
Timer = Callable[[Sequence[tuple[Path, np.ndarray]]], list[Timing]]


def bucket(channels: int) -> int:
    """``channels`` rounded up to the table's ladder: exact up to ``EXACT_CHANNELS``, then ``STEPS_PER_OCTAVE``
    steps per doubling (multiples of 2^(octave - 2): ..., 28, 32, 40, 48, 56, 64, 80, ...), less what keeps the
    count a multiple of 16, of 8 but not 16, or of neither, as ``channels`` is (38 -> 39, 72 -> 72, 77 -> 79)."""
    if channels <= EXACT_CHANNELS:
        return channels
    step = 2 ** (math.ceil(math.log2(channels)) - 1 - int(math.log2(STEPS_PER_OCTAVE)))
    rung = -(-channels // step) * step
    if channels % 16 == 0:
        return rung - rung % 16
    if channels % 8 == 0:
        return rung - (rung - 8) % 16
    return rung - 1 if rung % 8 == 0 else rung


def _multiple(value: int, of: int) -> int:
    return -(-value // of) * of


class Scale(nn.Module):
    """A per-feature scale: the stem of a Linear layer (an elementwise Mul)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(features) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


@dataclass(frozen=True)
class Geometry:
    """What a layer's latency depends on: ``in_shape`` is its input at batch 1 without the batch axis ((C, L) or
    (C, H, W) for a Conv, (..., features) for a Linear)."""

    op: str  # "Conv1d", "Conv2d", "Linear", or "Scale" (a Linear's stem)
    in_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    int8: bool = False

    @classmethod
    def of(cls, layer: nn.Module, in_shape: tuple[int, ...], int8: bool) -> Geometry:
        """The bucketed geometry of a Conv1d/Conv2d/Linear ``layer`` whose input at batch 1 is ``in_shape``."""
        if isinstance(layer, nn.Linear):
            return cls("Linear", (*in_shape[:-1], bucket(in_shape[-1])), bucket(layer.out_features),
                       bias=layer.bias is not None, int8=int8)
        groups = layer.groups
        if groups == layer.in_channels:  # depthwise (times a multiplier): stays depthwise at the bucketed width
            groups = c_in = bucket(layer.in_channels)
        else:  # a grouped convolution keeps its groups: channels in multiples of them
            c_in = _multiple(bucket(layer.in_channels), groups)
        op = "Conv1d" if isinstance(layer, nn.Conv1d) else "Conv2d"  # a parametrized (masked) one is one too
        return cls(op, (c_in, *in_shape[1:]), _multiple(bucket(layer.out_channels), groups),
                   layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups, layer.bias is not None, int8)

    @property
    def key(self) -> str:
        """Readable: ``Conv2d in=32x8x8 out=64 k=3x3 s=1x1 p=1x1 d=1x1 g=1 bias int8``."""
        def dims(v: tuple[int, ...] | str) -> str:
            return v if isinstance(v, str) else "x".join(map(str, v))

        parts = [self.op, f"in={dims(self.in_shape)}", f"out={self.out_channels}"]
        if self.op.startswith("Conv"):
            parts += [f"k={dims(self.kernel)}", f"s={dims(self.stride)}", f"p={dims(self.padding)}",
                      f"d={dims(self.dilation)}", f"g={self.groups}"]
        return " ".join([*parts, *(["bias"] if self.bias else []), "int8" if self.int8 else "fp32"])

    def stem(self) -> Geometry:
        """The cheapest layer that maps this layer's input to itself in the same kernels and layout."""
        if self.op == "Linear":
            return Geometry("Scale", self.in_shape, self.in_shape[-1], int8=self.int8)
        channels, ones = self.in_shape[0], (1,) * len(self.kernel)
        return replace(self, out_channels=channels, kernel=ones, stride=ones, padding=(0,) * len(ones),
                       dilation=ones, groups=channels, bias=True)

    def weights(self) -> int:
        """How many weights the layer has (biases left out)."""
        if self.op in ("Scale", "Linear"):
            return self.in_shape[-1] * (self.out_channels if self.op == "Linear" else 1)
        return self.out_channels * self.in_shape[0] // self.groups * math.prod(self.kernel)

    def module(self) -> nn.Module:
        """The layer, with random weights."""
        if self.op == "Scale":
            return Scale(self.out_channels)
        if self.op == "Linear":
            return nn.Linear(self.in_shape[-1], self.out_channels, bias=self.bias)
        return getattr(nn, self.op)(self.in_shape[0], self.out_channels, self.kernel, self.stride, self.padding,
                                    self.dilation, self.groups, self.bias)


Graph = tuple[Geometry, ...]  # what one table entry times: layers in a chain, each followed by a ReLU
# timed beside every batch of entries, which are scaled to its time in the table (``LatencyTable``)
REFERENCE: Graph = (Geometry("Conv2d", (16, 16, 16), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),)


def graph_key(graph: Graph) -> str:
    return " -> ".join(g.key for g in graph)


def graphs(geometries: Sequence[Geometry]) -> list[Graph]:
    """The graphs a prediction for ``geometries`` reads: each layer behind its stem, and each stem alone."""
    return list(dict.fromkeys(graph for g in geometries for graph in ((g.stem(),), (g.stem(), g))))


def weight_bytes(geometries: Iterable[Geometry]) -> int:
    """The bytes of the layers' weights as the artifact's kernels read them: one a weight int8, four fp32."""
    return sum(g.weights() * (1 if g.int8 else 4) for g in geometries)


def predicted_ms(entries: Mapping[str, Timing], geometries: Sequence[Geometry], cold: bool) -> float:
    """The fixed cost (the first layer's stem alone) plus the time each layer adds behind its stem: the ``cold``
    entries (weights read from beyond L2) or the hot ones."""
    if not geometries:
        raise ValueError("The model has no Conv1d/Conv2d/Linear layer to predict its latency from.")

    def ms(graph: Graph) -> float:
        return entries[graph_key(graph)][int(cold)]

    added = (ms((g.stem(), g)) - ms((g.stem(),)) for g in geometries)
    return ms((geometries[0].stem(),)) + sum(max(t, 0.0) for t in added)


def layer_geometries(model: nn.Module, example_input: Tensor, int8_layers: Collection[str]) -> list[Geometry]:
    """The bucketed geometry of every call of a Conv1d/Conv2d/Linear module in one forward pass of
    ``example_input`` (batch 1), in call order, int8 where the module's name is in ``int8_layers``."""
    found: list[Geometry] = []

    def hook(name: str, layer: nn.Module):
        return lambda _module, args: found.append(Geometry.of(layer, tuple(args[0].shape[1:]), name in int8_layers))

    hooks = [m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return found


def deploy_graph(graph: Graph, folder: Path) -> tuple[Path, np.ndarray]:
    """Deploy ``graph`` (seeded random weights, a ReLU after each layer) as a trial deploys a model, fp32 or static
    int8 as its layers are, into ``folder``: the file and an input at batch 1."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*[m for g in graph for m in (g.module(), nn.ReLU())]).eval()
        x = torch.randn(CALIBRATION_SAMPLES, *graph[0].in_shape)
    path = folder / f"{hashlib.sha256(graph_key(graph).encode()).hexdigest()[:16]}.onnx"
    deploy(model, x[:1], INT8 if graph[-1].int8 else FP32, x.numpy(), path)
    return path, x[:1].numpy()


def machine(threads: int) -> dict[str, str | int]:
    """What a table's entries hold for: this CPU, the kernels in use, ONNX Runtime's version, threads, protocol."""
    return {"cpu": machine_cpu(), "kernels": kernels.in_use(), "onnxruntime": version("onnxruntime"),
            "threads": threads, "protocol": PROTOCOL}


def table_path(threads: int = 1) -> Path:
    """``cache_dir()/latency/<digest of machine(threads)>.json``."""
    digest = hashlib.sha256(json.dumps(machine(threads), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "latency" / f"{digest}.json"


def read_entries(path: Path, expected: Mapping[str, str | int]) -> tuple[float | None, dict[str, Timing]]:
    """The reference's milliseconds and the entries of the table file at ``path``; none, with a warning, if it is
    unreadable, incomplete or written for another machine (``machine``)."""
    if not path.exists():
        return None, {}
    try:
        data = json.loads(path.read_text())
        reference, entries = data["reference_ms"], data["entries"]
        if data["schema_version"] != SCHEMA_VERSION or data["machine"] != dict(expected):
            raise ValueError(f"written for {data['machine']}, schema {data['schema_version']}")
        values = [reference, *(v for timing in entries.values() for v in timing)]
        if not all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values) or \
                any(len(timing) != 2 for timing in entries.values()):
            raise ValueError("an entry is not a pair of finite, non-negative numbers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(f"Latency table {path} not used ({type(error).__name__}: {error}); its entries are "
                      "measured again.", stacklevel=3)
        return None, {}
    return reference, {key: tuple(timing) for key, timing in entries.items()}


def _scaled(entries: Mapping[str, Timing], factor: float) -> dict[str, Timing]:
    return {key: (hot * factor, cold * factor) for key, (hot, cold) in entries.items()}


class LatencyTable:
    """Hot and cold milliseconds per table graph (``graphs``), measured lazily with ``timer`` and kept at ``path``.

    ``timer`` times ONNX files side by side (default ``time_onnx`` at ``threads`` threads); ``path`` defaults to
    ``table_path(threads)``; a model whose weights take more than ``cache_bytes`` (default ``l2_bytes()``) is
    predicted from the cold entries. Entries already in the file are reused; new ones are added to it.

    Entries measured at different times are put on one scale, as ``autocomp.latency`` compares an artifact with
    a reference: every batch of new graphs is timed side by side with ``REFERENCE``, and its times are scaled by
    the reference's hot milliseconds when the table was begun (``reference_ms``) over those in the batch. So a
    prediction never changes once made, and ranks with every later one (as a study's latencies are on the scale
    of its teacher's when it began, ``measure.with_ratios``).
    """

    def __init__(self, path: Path | None = None, timer: Timer | None = None, threads: int = 1,
                 cache_bytes: int | None = None) -> None:
        self.path = table_path(threads) if path is None else Path(path)
        self.timer = timer or functools.partial(time_onnx, threads=threads)
        self.cache_bytes = l2_bytes() if cache_bytes is None else cache_bytes
        self.machine = machine(threads)
        self.reference_ms, self.entries = read_entries(self.path, self.machine)

    def predict(self, model: nn.Module, example_input: Tensor, int8_layers: Collection[str]) -> float:
        """Predicted milliseconds of one inference of ``model``'s artifact at batch 1, ``int8_layers`` (module
        names) on int8 kernels: a fixed cost plus the entries of its Conv/Linear calls (other ops count nothing),
        cold if its weights do not fit in ``cache_bytes``."""
        geometries = layer_geometries(model, example_input, set(int8_layers))
        self.measure(graphs(geometries))
        return predicted_ms(self.entries, geometries, cold=weight_bytes(geometries) > self.cache_bytes)

    def measure(self, needed: Iterable[Graph]) -> int:
        """Time the graphs the table lacks (beside ``REFERENCE``) and save it; how many were timed."""
        missing = [graph for graph in needed if graph_key(graph) not in self.entries]
        if missing:
            with tempfile.TemporaryDirectory() as tmp:
                reference, *times = self.timer([deploy_graph(graph, Path(tmp)) for graph in [REFERENCE, *missing]])
            timed = self._on_scale(reference[0], dict(zip(map(graph_key, missing), times, strict=True)))
            self.entries.update(timed)  # after ``_on_scale``, which may rescale (replace) the entries
            self.save()
        return len(missing)

    def _on_scale(self, reference_ms: float, entries: dict[str, Timing]) -> dict[str, Timing]:
        """``entries`` timed beside a reference of ``reference_ms`` (hot), on this table's scale."""
        if self.reference_ms is None:
            self.reference_ms = reference_ms
        return _scaled(entries, self.reference_ms / reference_ms)

    def save(self) -> None:
        """Merge the entries with those another process saved meanwhile and replace the file atomically."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.path}.lock"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unusable file was reported when loaded; it is replaced now
                reference, saved = read_entries(self.path, self.machine)
            if reference is not None:  # the file's scale: another process began it meanwhile
                self.entries = {**saved, **_scaled(self.entries, reference / self.reference_ms)}
                self.reference_ms = reference
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "machine": self.machine,
                                       "reference_ms": self.reference_ms,
                                       "entries": dict(sorted(self.entries.items()))}, indent=1))
            os.replace(tmp, self.path)  # atomic: a concurrent search never reads half a file
