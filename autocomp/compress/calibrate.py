"""Calibration: the clipping range [lo, hi] for b-bit quantization of a tensor, from sample batches.

The same calibrators set the ranges of the fake-quantized model (QAT, PTQ simulation) and of the
deployed ONNX Runtime int8 artifact, so what is searched is what is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from autocomp.registry import Registry

Range = tuple[float, float]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: [-2^(b-1), 2^(b-1) - 1] symmetric (zero point 0), [0, 2^b - 1] asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def scale_zero_point(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Affine parameters of ranges (per tensor, or per channel when lo and hi are vectors).

    The range is widened to hold 0 exactly, so zero padding and ReLU zeros are exact.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.clamp(qmin - torch.round(lo / scale.clamp_min(1e-12)), qmin, qmax).to(torch.int32)
    return scale.clamp_min(1e-12).float(), zero_point


def weight_range(w: Tensor, per_channel: bool, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Min-max range of a weight whose output channels lie on axis 0: (C,) vectors per channel,
    scalars per tensor; symmetric: +-max|w|. The grid QAT trains on is the one ``pack.py`` deploys."""
    flat = w.detach().flatten(1) if per_channel else w.detach().reshape(1, -1)  # (C or 1, K)
    lo, hi = flat.amin(1), flat.amax(1)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    return (lo, hi) if per_channel else (lo[0], hi[0])


def fake_quantize(x: Tensor, lo: Tensor | float, hi: Tensor | float, bits: int, symmetric: bool,
                  axis: int | None = None) -> Tensor:
    """Quantize-dequantize ``x`` onto the b-bit grid of [lo, hi]; gradients pass straight through
    inside the range (STE). Per channel along ``axis`` when lo and hi are vectors."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    scale, zero_point = scale_zero_point(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


class Calibrator:
    """Chooses the range of one tensor from the batches it took during calibration: by default from all of their
    values at once (``range_of``); a calibrator that reads the batches in turn overrides ``range``."""

    def range(self, batches: list[Tensor], bits: int, symmetric: bool) -> Range:
        return self.range_of(_all(batches), bits, symmetric)

    def range_of(self, x: Tensor, bits: int, symmetric: bool) -> Range:
        """The range of the values ``x`` (flat, fp32)."""
        raise NotImplementedError(f"{type(self).__name__} reads the batches in turn: call range()")


CALIBRATORS: Registry[type[Calibrator]] = Registry("calibration method")  # classes: variants are arguments


def _all(batches: list[Tensor]) -> Tensor:
    return torch.cat([b.detach().flatten().float() for b in batches])


@CALIBRATORS.register("minmax", "min and max over the calibration set: no clipping, the widest steps")
class MinMax(Calibrator):
    def range_of(self, x: Tensor, bits: int, symmetric: bool) -> Range:
        return float(x.min()), float(x.max())


@CALIBRATORS.register("moving_average", "exponential moving average of per-batch min and max (QAT observers)")
@dataclass
class MovingAverage(Calibrator):
    momentum: float = 0.01

    def range(self, batches: list[Tensor], bits: int, symmetric: bool) -> Range:  # batch by batch
        lo, hi = float(batches[0].min()), float(batches[0].max())
        for b in batches[1:]:
            lo += self.momentum * (float(b.min()) - lo)
            hi += self.momentum * (float(b.max()) - hi)
        return lo, hi


@CALIBRATORS.register("percentile", "the 99.99th percentile of |x| (or the 0.01/99.99 percentiles): clips outliers")
class Percentile(Calibrator):
    def __init__(self, percentile: float = 99.99) -> None:
        self.q = percentile / 100.0

    def range_of(self, x: Tensor, bits: int, symmetric: bool) -> Range:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:2**24]]  # quantile's size limit
        if symmetric:
            t = float(torch.quantile(x.abs(), self.q))
            return -t, t
        return float(torch.quantile(x, 1.0 - self.q)), float(torch.quantile(x, self.q))


@CALIBRATORS.register("mse", "the clipping of the min-max range that minimises the mean squared quantization error")
@dataclass
class MSE(Calibrator):
    candidates: int = 100

    def range_of(self, x: Tensor, bits: int, symmetric: bool) -> Range:
        lo, hi = float(x.min()), float(x.max())
        if symmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        best, best_error = (lo, hi), float("inf")
        for alpha in np.linspace(1.0 / self.candidates, 1.0, self.candidates):
            error = float((fake_quantize(x, alpha * lo, alpha * hi, bits, symmetric) - x).pow(2).mean())
            if error < best_error:
                best, best_error = (alpha * lo, alpha * hi), error
        return best


@CALIBRATORS.register("entropy", "the threshold minimising KL(fp32 || quantized) histograms (TensorRT, Migacz 2017)")
@dataclass
class Entropy(Calibrator):
    bins: int = 2048

    def range_of(self, x: Tensor, bits: int, symmetric: bool) -> Range:
        magnitudes = x.abs()[x != 0].numpy()  # exact zeros (ReLU outputs) stay exact on any grid holding 0
        hist, edges = np.histogram(magnitudes, bins=self.bins, range=(0.0, float(x.abs().max()) or 1.0))
        levels = 2 ** (bits - 1)  # quantized bins on one side of zero
        threshold = min((self._kl(hist, i, levels), edges[i]) for i in range(levels, self.bins + 1, 8))[1]
        return (0.0 if float(x.min()) >= 0 else -float(threshold)), float(threshold)

    @staticmethod
    def _kl(hist: np.ndarray, i: int, levels: int) -> float:
        """KL between the histogram clipped at bin i (outliers folded into the last bin) and its
        quantization to ``levels`` bins, each spreading its mass over its non-empty source bins."""
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        sizes = np.full(levels, i // levels) + (np.arange(levels) < i % levels)  # as np.array_split
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        nonzero = hist[:i] > 0
        mass, support = np.add.reduceat(hist[:i], starts), np.add.reduceat(nonzero, starts)
        q = np.repeat(mass / np.maximum(support, 1), sizes) * nonzero
        mask = p > 0
        p, q = p / p.sum(), q / max(q.sum(), 1e-12)
        return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
