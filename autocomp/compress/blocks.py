"""Block dropping: remove whole residual blocks, the ones whose branch adds least to their input.

A residual block computes x + f(x) (then maybe an activation); dropped, it computes x (Veit et
al., NeurIPS 2016: residual networks degrade gracefully when single blocks are removed).

A submodule is a block when its own forward, traced by torch.fx with every submodule it calls
kept as one node, returns its input added to a computed branch (an identity shortcut), possibly
through elementwise activations, and a real forward pass gives an output of its input's shape:
``Residual``, torchvision's BasicBlock/Bottleneck without downsample, ``x = x + self.body(x)``.
A projection shortcut (``downsample(x) + f(x)``) is not one: dropping it would change shapes.
torch's own layers are never blocks, and a module fx cannot trace (data-dependent control flow)
is not one. A block inside a block is not listed: dropping the outer one removes it, so every
listed block can be dropped independently of the others.

A block's score is the mean of ||block(x) - x|| / ||x|| over training inputs (||f(x)|| / ||x||
for ``Residual``).
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from autocomp.features import Tap

ADDS = {"add", "add_", "iadd"}
ACTIVATIONS = {"relu", "relu_", "relu6", "leaky_relu", "leakyrelu", "gelu", "silu", "hardswish", "elu", "sigmoid",
               "tanh"}


class Residual(nn.Module):
    """x + body(x): a block that block dropping may remove whole (it then passes x through)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _OwnForward(fx.Tracer):
    """Traces one module's own forward: every submodule it calls stays a single node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _called(node: fx.Node, root: nn.Module) -> str:
    """What a node calls, lower-case: a function or method name ("add", "relu") or a module's class name."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__.lower()
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _adds_its_input(module: nn.Module) -> bool:
    """Whether ``module``'s forward returns its one input + a branch, possibly through elementwise activations."""
    if fx.Tracer().is_leaf_module(module, ""):  # torch's own layers
        return False
    try:
        graph = _OwnForward().trace(module)
    except Exception:  # fx cannot trace arbitrary Python (data-dependent control flow, ...): not a block
        return False
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    node = graph.output_node().args[0]
    while isinstance(node, fx.Node) and _called(node, module) in ACTIVATIONS and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return (len(inputs) == 1 and isinstance(node, fx.Node) and _called(node, module) in ADDS
            and len(node.all_input_nodes) == 2 and inputs[0] in node.all_input_nodes)


@torch.no_grad()
def _blocks(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Each outermost residual block's input and output on ``x``, in model order."""
    model.eval()  # trace and run the inference code paths: no BatchNorm statistics updated
    names = [name for name, module in model.named_modules() if name and _adds_its_input(module)]
    with Tap(model, names, inputs=True) as inputs, Tap(model, names) as outputs:
        model(x)
    blocks: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:  # outer blocks come before the blocks they hold
        block_in, block_out = inputs.values.get(name), outputs.values.get(name)
        if (isinstance(block_in, Tensor) and isinstance(block_out, Tensor) and block_out.shape == block_in.shape
                and not any(name.startswith(f"{outer}.") for outer in blocks)):
            blocks[name] = block_in, block_out
    return blocks


def residual_blocks(model: nn.Module, example_input: Tensor) -> list[str]:
    """Names of the model's residual blocks (module docstring), outermost only, in model order."""
    return list(_blocks(model, example_input))


def block_scores(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Each block's relative contribution ||block(x) - x|| / ||x||, averaged over the samples of ``x``."""
    return {name: float(((block_out - block_in).flatten(1).norm(dim=1)
                         / block_in.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
            for name, (block_in, block_out) in _blocks(model, x).items()}


def drop_blocks(model: nn.Module, count: int, x: Tensor) -> list[str]:
    """Replace the ``count`` lowest-scored blocks with identities; return their names."""
    scores = block_scores(model, x)
    dropped = sorted(scores, key=scores.__getitem__)[:count]
    for name in dropped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return dropped
