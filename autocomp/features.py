"""Forward hooks that record what named layers compute, for distillation and activation criteria."""

from __future__ import annotations

import torch
from torch import Tensor, nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


class Hooks:
    """Holds hooks on a model: ``close()`` removes them; as a context manager, on leaving it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tap(Hooks):
    """Records, on every forward pass, the output (or the input) of each named module.

    Use as a context manager, or call ``close()``; ``values[name]`` holds the latest tensor.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: bool = False) -> None:
        modules = dict(model.named_modules())
        self.values: dict[str, Tensor] = {}
        if inputs:
            self._hooks = [modules[n].register_forward_pre_hook(self._recorder(n, take_input=True)) for n in names]
        else:
            self._hooks = [modules[n].register_forward_hook(self._recorder(n)) for n in names]

    def _recorder(self, name: str, take_input: bool = False):
        def record(_module, args, output=None):
            self.values[name] = args[0] if take_input else output

        return record

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def layer_names(model: nn.Module) -> list[str]:
    """Names of the Conv/Linear layers, in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def head_layer(model: nn.Module, example_input: Tensor) -> str:
    """The Conv/Linear layer whose output is the model's output (else the last one registered)."""
    names = layer_names(model)
    with Tap(model, names) as tap, torch.no_grad():
        final = model.eval()(example_input)
    heads = [n for n, out in tap.values.items() if out.data_ptr() == final.data_ptr()]
    return heads[0] if heads else names[-1]
