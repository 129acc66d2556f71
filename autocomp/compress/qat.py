"""Quantization-aware training: the fine-tune sees fake-quantized weights and layer inputs.

Weights are fake-quantized on every access (symmetric, min-max per tensor or per channel, as the
deployed int8 weights); each Conv/Linear input is fake-quantized to 8 bits over the range the
recipe's calibrator picked on training data. The straight-through estimator lets gradients
reach the float weights (Jacob et al., CVPR 2018). A weight masked by unstructured pruning
(``prune.WeightMask``) is masked first, then fake-quantized: its range is the masked weight's, zeros
included, as deployed; a zero stays exactly zero on any grid (0 is a level of every grid, ``calibrate.py``)
and the mask stops the gradient of pruned weights. With a distillation loss (``pipeline.fine_tune`` nests the two)
this is quantized distillation (Polino et al., ICLR 2018): the student learns the teacher's soft targets with its
quantizers in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autocomp.compress.calibrate import CALIBRATORS, fake_quantize, weight_range
from autocomp.features import Tap


class WeightFakeQuant(nn.Module):
    """Min-max fake quantization of a weight on access, as ``pack.py``/ONNX Runtime deploy it."""

    def __init__(self, bits: int, per_channel: bool, symmetric: bool = True) -> None:
        super().__init__()
        self.bits, self.per_channel, self.symmetric = bits, per_channel, symmetric

    def forward(self, w: Tensor) -> Tensor:
        lo, hi = weight_range(w, self.per_channel, self.symmetric)
        return fake_quantize(w, lo, hi, self.bits, self.symmetric, axis=0 if self.per_channel else None)


def input_ranges(model: nn.Module, layers: list[str], x: Tensor, calibration: str) -> dict[str, tuple[float, float]]:
    """The 8-bit range of each layer's input, chosen by ``calibration`` on batches of ``x``. A layer its parent
    never calls as a module (``nn.MultiheadAttention`` reads ``out_proj``'s weight directly) has none."""
    batches: dict[str, list[Tensor]] = {name: [] for name in layers}
    with Tap(model, layers, inputs=True) as tap, torch.no_grad():
        for i in range(0, len(x), 32):
            model.eval()(x[i : i + 32])
            for name in tap.values:
                batches[name].append(tap.values[name])
    calibrator = CALIBRATORS.get(calibration)()
    return {name: calibrator.range(found, 8, symmetric=False) for name, found in batches.items() if found}


def _input_quantizer(lo: float, hi: float):
    return lambda _module, args: (fake_quantize(args[0], lo, hi, 8, symmetric=False), *args[1:])


def _remove_fake_quant(layer: nn.Module) -> None:
    """Take the fake quantizer, the weight's last parametrization, off ``layer``; any before it (a pruning
    mask) stays."""
    chain = layer.parametrizations.weight
    if len(chain) > 1:
        del chain[-1]
    else:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


@contextlib.contextmanager
def quantization_aware(model: nn.Module, bits: dict[str, int], x: Tensor, calibration: str,
                       per_channel: bool = False, symmetric: bool = True,
                       quantize_inputs: bool | Collection[str] = True) -> Iterator[nn.Module]:
    """Within the block, each layer named in ``bits`` with integer weights (<= 8 bits) computes with
    fake-quantized weights of its width, and with 8-bit inputs where ``quantize_inputs`` says: all
    these layers (True), none (False), or the layers it names (those on int8 kernels)."""
    modules = dict(model.named_modules())
    layers = [name for name, b in bits.items() if b <= 8]
    int8 = [n for n in layers if n in quantize_inputs] if isinstance(quantize_inputs, Collection) else (
        layers if quantize_inputs else [])
    ranges = input_ranges(model, int8, x, calibration) if int8 else {}
    hooks = [modules[name].register_forward_pre_hook(_input_quantizer(*ranges[name])) for name in ranges]
    for name in layers:
        parametrize.register_parametrization(modules[name], "weight",
                                             WeightFakeQuant(bits[name], per_channel, symmetric))
    try:
        yield model
    finally:
        for name in layers:
            _remove_fake_quant(modules[name])
        for hook in hooks:
            hook.remove()
