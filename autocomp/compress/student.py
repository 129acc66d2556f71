"""Student architectures (NAS-based distillation): the network a trial distils the teacher into.

A family is a registered builder from a small typed config, with a search space of its own (``space``:
the YAML form of each field's choices, which a study's space may override):

- ``teacher``: the teacher's own graph, ``depth`` and ``width`` multiplied: that share of its residual blocks
  kept (the least contributing dropped, ``autocomp.compress.blocks``), that share of every pruning group's
  channels kept (the highest L1 norm), initialised from the teacher's kept weights or from scratch;
- ``cnn``: stages of convolution blocks (1-D or 2-D, as the input is), optional residual connections and
  depthwise-separable blocks, a pooling or flattening head;
- ``mlp``: Linear layers on the flattened input, with optional normalisation;
- ``transformer``: a patch embedding, pre-LN ``nn.TransformerEncoderLayer`` layers, mean pooling, a linear head.

Builders read only the example input's shape and the teacher's number of outputs, so every family fits any
task whose input it can take (``build_student`` says in one line when it cannot).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autocomp.compress.blocks import Residual, drop_blocks, residual_blocks
from autocomp.compress.facts import teacher_facts
from autocomp.compress.prune import prune
from autocomp.config import from_dict, to_dict
from autocomp.errors import ConfigError, check_choice, check_range
from autocomp.recipe import INITS, LayerPrune, Prune, Student
from autocomp.registry import Registry

if TYPE_CHECKING:
    from autocomp.tasks.base import Task


@dataclass(frozen=True)
class Family:
    """A student family: its config dataclass, ``build(config, task) -> model`` and the choices its space offers
    per knob (YAML form). ``count`` names the knob that says how many stages (layers) there are; each knob of
    ``per_item`` is sampled once per stage, up to the most stages, and becomes a list field; ``finish`` turns
    the remaining knobs into fields. ``derived``: its students are the teacher's graph (may keep its weights)."""

    config: type
    build: Callable[[Any, Task], nn.Module]
    space: dict[str, Any]
    derived: bool = False
    count: str | None = None
    per_item: tuple[str, ...] = ()
    finish: Callable[[dict[str, Any]], dict[str, Any]] = dict

    def dimensions(self, space: dict[str, Any]) -> dict[str, Any]:
        """Knob name -> its parameter, a per-item knob once per possible stage (``width.1``, ``width.2``...)."""
        most = max(space[self.count].candidates()) if self.count else 0
        dims = {}
        for knob, param in space.items():
            names = [f"{knob}.{i}" for i in range(1, most + 1)] if knob in self.per_item else [knob]
            dims |= {name: param for name in names}
        return dims

    def decode(self, values: dict[str, Any]) -> dict[str, Any]:
        """The config (as a dict) that one value per dimension stands for: the first ``count`` of each per-item
        knob's values, the others as they are."""
        config = {k: v for k, v in values.items() if "." not in k and k != self.count}
        for knob in self.per_item:
            config[knob] = [values[f"{knob}.{i}"] for i in range(1, values[self.count] + 1)]
        return self.finish(config)

    def encode(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dimension values (knob names as ``dimensions`` gives them) of a config that ``decode`` would give,
        where its fields are the knobs: one per stage of each per-item knob, the count from their length, the
        other knobs as they are; a knob the config has no field for is left out."""
        values = {knob: config[knob] for knob in self.space if knob in config and knob not in self.per_item}
        for knob in self.per_item:
            values |= {f"{knob}.{i}": value for i, value in enumerate(config[knob], start=1)}
            if self.count:
                values[self.count] = len(config[knob])
        return values


STUDENTS: Registry[Family] = Registry("student family")


@dataclass
class TeacherConfig:
    depth: float = 1.0  # share of the residual blocks kept
    width: float = 1.0  # share of every pruning group's channels kept

    def __post_init__(self) -> None:
        check_range("depth", self.depth, 0.0, 1.0)
        check_range("width", self.width, 0.05, 1.0)


@dataclass
class CNNConfig:
    depth: list[int] = field(default_factory=lambda: [1, 1])  # blocks per stage; a 2x pooling between stages
    width: list[int] = field(default_factory=lambda: [16, 32])  # channels per stage
    kernel: int = 3
    residual: bool = False  # blocks after a stage's first add their input (``Residual``)
    depthwise: bool = False  # depthwise kernel x kernel then pointwise 1x1 instead of one full convolution
    head: str = "avg"  # "avg": global average pooling; "flatten": every position into the classifier

    def __post_init__(self) -> None:
        if not self.depth or len(self.depth) != len(self.width):
            raise ConfigError(f"must give one depth per stage (one per width {self.width}), but got {self.depth}.",
                              "depth")
        for i, (d, w) in enumerate(zip(self.depth, self.width, strict=True)):
            check_range(f"depth[{i}]", d, 1, 16)
            check_range(f"width[{i}]", w, 1, 4096)
        check_choice("kernel", self.kernel, (1, 3, 5, 7))
        check_choice("head", self.head, ("avg", "flatten"))


@dataclass
class MLPConfig:
    width: list[int] = field(default_factory=lambda: [128])  # hidden units per layer (depth = its length)
    norm: str = "none"  # "batch", "layer" or "none" after each hidden Linear

    def __post_init__(self) -> None:
        for i, w in enumerate(self.width):
            check_range(f"width[{i}]", w, 1, 65536)
        check_choice("norm", self.norm, ("none", "batch", "layer"))


@dataclass
class TransformerConfig:
    layers: int = 2
    heads: int = 2
    width: int = 32  # model width, a multiple of heads
    mlp_ratio: int = 2  # the MLP's hidden units per model channel
    patch: int = 4  # samples (pixels per side) per token

    def __post_init__(self) -> None:
        check_range("layers", self.layers, 1, 48)
        check_range("heads", self.heads, 1, 64)
        check_range("mlp_ratio", self.mlp_ratio, 1, 8)
        check_range("patch", self.patch, 1, 64)
        if self.width % self.heads:
            raise ConfigError(f"must be a multiple of heads ({self.heads}), but got {self.width}.", "width")


def _outputs(task: Task) -> int:
    with torch.no_grad():
        return int(task.teacher.eval()(task.example_input).shape[-1])


def _spatial(task: Task, family: str) -> tuple[int, ...]:
    """The example input's positions (after batch and channels): 1-D or 2-D, else a one-line error."""
    shape = tuple(task.example_input.shape[2:])
    if len(shape) not in (1, 2):
        raise ConfigError(f"needs an input of shape (batch, channels, length) or (batch, channels, height, width), "
                          f"but the {task.name!r} task's example input is {tuple(task.example_input.shape)}.",
                          f"student.family {family!r}")
    return shape


def build_derived(config: TeacherConfig, task: Task) -> nn.Module:
    """A copy of the teacher without its least contributing blocks (round((1 - depth) x blocks)) and with
    round((1 - width) x channels) of every pruning group removed, the lowest L1 norm first."""
    model = copy.deepcopy(task.teacher)
    blocks = residual_blocks(model, task.example_input)
    if config.depth < 1.0 and blocks:
        drop_blocks(model, round((1.0 - config.depth) * len(blocks)), task.train.x[:256])
    if config.width < 1.0:
        original = teacher_facts(task).prunable  # the teacher's groups, found once per teacher
        groups = {layer.group for layer in original.values()}
        plan = Prune(layers={group: LayerPrune(1.0 - config.width) for group in groups})
        prune(model, task.example_input, plan, original, task.train)
    return model


class ConvBlock(nn.Sequential):
    """Convolution (or depthwise then pointwise), BatchNorm, ReLU."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: int, depthwise: bool) -> None:
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        if depthwise:
            layers = [conv(c_in, c_in, kernel, padding=kernel // 2, groups=c_in, bias=False), norm(c_in), nn.ReLU(),
                      conv(c_in, c_out, 1, bias=False)]
        else:
            layers = [conv(c_in, c_out, kernel, padding=kernel // 2, bias=False)]
        super().__init__(*layers, norm(c_out), nn.ReLU())


def build_cnn(config: CNNConfig, task: Task) -> nn.Module:
    spatial = _spatial(task, "cnn")
    dims, channels = len(spatial), task.example_input.shape[1]
    pool = nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)
    layers: list[nn.Module] = []
    size = list(spatial)
    for stage, (depth, width) in enumerate(zip(config.depth, config.width, strict=True)):
        if stage and min(size) >= 2:
            layers.append(copy.deepcopy(pool))
            size = [s // 2 for s in size]
        for block in range(depth):
            body = ConvBlock(dims, channels, width, config.kernel, config.depthwise)
            layers.append(Residual(body) if config.residual and block else body)
            channels = width
    if config.head == "avg":
        layers += [nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = channels
    else:
        layers.append(nn.Flatten())
        features = channels * math.prod(size)
    return nn.Sequential(*layers, nn.Linear(features, _outputs(task)))


def build_mlp(config: MLPConfig, task: Task) -> nn.Module:
    features = math.prod(task.example_input.shape[1:])
    layers: list[nn.Module] = [nn.Flatten()]
    for width in config.width:
        norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}.get(config.norm)
        layers += [nn.Linear(features, width), *([norm(width)] if norm else []), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, _outputs(task)))


class TransformerStudent(nn.Module):
    """Non-overlapping patches (zero-padded to a whole number) -> tokens of ``width`` plus learned positions ->
    pre-LN encoder layers (GELU MLP) -> LayerNorm -> mean over tokens -> linear head."""

    def __init__(self, config: TransformerConfig, channels: int, spatial: tuple[int, ...], outputs: int) -> None:
        super().__init__()
        p = config.patch
        self.pad = [v for s in reversed(spatial) for v in (0, (-s) % p)]  # F.pad order: last dimension first
        conv = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
        self.embed = conv(channels, config.width, p, stride=p)
        tokens = math.prod(math.ceil(s / p) for s in spatial)
        self.position = nn.Parameter(torch.zeros(1, tokens, config.width))
        layer = nn.TransformerEncoderLayer(config.width, config.heads, config.mlp_ratio * config.width, dropout=0.1,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, norm=nn.LayerNorm(config.width),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(config.width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(nn.functional.pad(x, self.pad)).flatten(2).transpose(1, 2) + self.position
        return self.head(self.encoder(tokens).mean(1))


def build_transformer(config: TransformerConfig, task: Task) -> nn.Module:
    spatial = _spatial(task, "transformer")
    return TransformerStudent(config, task.example_input.shape[1], spatial, _outputs(task))


def _transformer_width(config: dict[str, Any]) -> dict[str, Any]:
    """``head_width`` (channels per head) times ``heads`` is the model width, a multiple of heads by construction."""
    config["width"] = config["heads"] * config.pop("head_width")
    return config


STUDENTS.add("teacher", Family(TeacherConfig, build_derived, {"depth": [1.0, 0.5, 0.0],
                                                                "width": [1.0, 0.75, 0.5, 0.25]}, derived=True),
             "the teacher's own graph with depth and width multipliers: residual blocks dropped, every pruning group "
             "narrowed; from its kept weights or from scratch")
STUDENTS.add("cnn", Family(CNNConfig, build_cnn, {"stages": [1, 2, 3], "depth": [1, 2], "width": [8, 16, 32, 64],
                                                  "kernel": [3, 5], "residual": [False, True],
                                                  "depthwise": [False, True], "head": ["avg", "flatten"]},
                           count="stages", per_item=("depth", "width")),
             "stages of conv blocks (1-D or 2-D as the input is), optional residual and depthwise-separable blocks, "
             "2x pooling between stages, pooled or flattened into a linear head")
STUDENTS.add("mlp", Family(MLPConfig, build_mlp, {"depth": [1, 2, 3], "width": [32, 64, 128, 256],
                                                  "norm": ["none", "batch", "layer"]},
                           count="depth", per_item=("width",)),
             "Linear layers on the flattened input (depth, width per layer), ReLU, optional BatchNorm or LayerNorm, "
             "a linear head")
STUDENTS.add("transformer", Family(TransformerConfig, build_transformer,
                                   {"layers": [1, 2, 3], "heads": [1, 2, 4], "head_width": [8, 16, 32],
                                    "mlp_ratio": [1, 2, 4], "patch": [2, 4, 8]}, finish=_transformer_width),
             "patch embedding, pre-LN transformer encoder layers (layers, heads, width per head, MLP ratio, patch "
             "size), mean pooling, a linear head")


def family(name: str, field_name: str = "student.family") -> Family:
    return STUDENTS.get(name, field=field_name)


def can_build(name: str, task: Task) -> bool:
    """Whether family ``name`` can take ``task``'s input (its default config builds)."""
    chosen = family(name)
    try:
        chosen.build(chosen.config(), task)
    except ConfigError:
        return False
    return True


def config_of(spec: Student) -> Any:
    """The typed config of a recipe's student section."""
    return from_dict(family(spec.family).config, spec.config, "config")


def resolved(spec: Student) -> Student:
    """``spec`` as its family reads it: ``init`` the first the family allows where empty ("teacher" for the
    teacher's graph, else "scratch") and checked, every ``config`` field given (checked by the family's config)."""
    derived = family(spec.family, "family").derived
    init = spec.init or ("teacher" if derived else "scratch")
    check_choice("init", init, INITS if derived else ("scratch",))
    return Student(spec.family, to_dict(config_of(spec)), init)


TEACHER = resolved(Student())  # the default student: the teacher itself, whole, with its weights


def is_teacher(spec: Student) -> bool:
    """Whether ``spec`` is the default student (``TEACHER``)."""
    return resolved(spec) == TEACHER


def build_student(spec: Student, task: Task, seed: int = 0) -> nn.Module:
    """The student ``spec`` describes for ``task``: a new network of its family (initialised from ``seed``), or
    the teacher's graph with its kept weights (``init`` "teacher") or re-initialised (``init`` "scratch")."""
    chosen = family(spec.family)
    torch.manual_seed(seed)
    model = chosen.build(config_of(spec), task)
    if chosen.derived and spec.scratch:
        reinitialise(model)
    return model


def reinitialise(model: nn.Module) -> None:
    """Every module's own initialisation (``reset_parameters``; ``nn.MultiheadAttention``'s private one); a
    parameter no such module owns (a learned position table) is drawn from N(0, 0.02^2)."""
    owned: set[int] = set()
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if module is not model and callable(reset):
            reset()
            owned |= {id(p) for p in module.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in owned:
                nn.init.normal_(p, std=0.02)
