"""Quantization-aware training: the fine-tune sees fake-quantized weights and layer inputs.

Weights are fake-quantized on every access (symmetric, min-max per tensor or per channel, as the
deployed int8 weights); each Conv/Linear input is fake-quantized to 8 bits over the range the
recipe's calibrator picked on training data. The straight-through estimator lets gradients
reach the float weights (Jacob et al., CVPR 2018).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autocomp.compress.calibrate import CALIBRATORS, fake_quantize
from autocomp.features import Tap


class WeightFakeQuant(nn.Module):
    def __init__(self, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits, self.per_channel = bits, per_channel

    def forward(self, w: Tensor) -> Tensor:
        if self.per_channel:
            hi = w.detach().flatten(1).abs().amax(1)  # (C_out,)
            return fake_quantize(w, -hi, hi, self.bits, symmetric=True, axis=0)
        hi = w.detach().abs().max()
        return fake_quantize(w, -hi, hi, self.bits, symmetric=True)


@contextlib.contextmanager
def quantization_aware(model: nn.Module, layers: list[str], x: Tensor, calibration: str,
                       bits: int = 8, per_channel: bool = False) -> Iterator[nn.Module]:
    """Within the block, ``layers`` of ``model`` compute with fake-quantized weights and inputs."""
    modules = dict(model.named_modules())
    with Tap(model, layers, inputs=True) as tap, torch.no_grad():
        batches: dict[str, list[Tensor]] = {name: [] for name in layers}
        for i in range(0, len(x), 32):
            model.eval()(x[i : i + 32])
            for name in layers:
                batches[name].append(tap.values[name])
    calibrator = CALIBRATORS.get(calibration)()
    ranges = {name: calibrator.range(batches[name], 8, symmetric=False) for name in layers}
    hooks = []
    for name in layers:
        parametrize.register_parametrization(modules[name], "weight", WeightFakeQuant(bits, per_channel))
        lo, hi = ranges[name]
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, lo=lo, hi=hi: (fake_quantize(args[0], lo, hi, 8, symmetric=False), *args[1:])))
    try:
        yield model
    finally:
        for name in layers:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
        for hook in hooks:
            hook.remove()
