"""Recipe: the complete, serialisable plan for compressing one model (ARCHITECTURE.md).

A recipe is data: its sections check their own fields, and the rules across them are here. The methods it names (a
criterion, a calibrator, a distillation kind, a student family) are plug-ins, checked against their registries where
a recipe is loaded or applied (``autocomp.methods.check_recipe``), which also fills in the student's defaults from
its family."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocomp.config import check_schema_version, from_dict, in_file, read_yaml, to_dict, write_yaml
from autocomp.errors import ConfigError, check_choice, check_range

SCHEMA_VERSION = 1
BITS = (32, 16, 8, 7, 6, 5, 4, 3, 2)
ACTIVATION_BITS = (32, 8)
QAT_BELOW = 5  # weights of fewer bits recover only with quantization-aware training
SCOPES = ("local", "global")
INITS = ("teacher", "scratch")  # a student's weights: the teacher's kept ones, or fresh
GRANULARITIES = ("channel", "weight")
PRUNE_INITS = ("trained", "rewind")  # kept weights after a pruning round: as trained, or rewound to early training


# Rules across a recipe's fields, each in one place: the Recipe validates with them, a search space decodes with
# them (``autocomp.space``) and screening shortens fine-tunes with them (``autocomp.fidelity``).
def least_epochs(rounds: int, qat: bool) -> int:
    """The fewest fine-tune epochs a recipe may hold: one after each pruning round where it prunes in rounds
    (``rounds`` > 1), and one to train with the quantizers in place where it uses ``qat``."""
    return max(rounds if rounds > 1 else 0, 1 if qat else 0)


def integer_weights(bits: int) -> bool:
    """Weights of ``bits`` lie on an integer grid (2-8 bits), whose symmetry and per-channel scales then apply."""
    return bits <= 8


def qat_allowed(bits: int) -> bool:
    """Quantization-aware training needs weights on an integer grid."""
    return integer_weights(bits)


def kmeans_allowed(bits: int, activation_bits: int, qat: bool) -> bool:
    """k-means weight sharing replaces the integer grid of weight-only quantization, after training (not QAT)."""
    return integer_weights(bits) and activation_bits == 32 and not qat


@dataclass
class LayerPrune:
    """Remove ``sparsity`` of a layer's output channels, the lowest by ``criterion``."""

    sparsity: float = 0.0
    criterion: str = "l1"

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)


@dataclass
class Student:
    """The network the teacher is distilled into (``autocomp.compress.student``): a registered ``family`` built
    from ``config`` (the family's typed config, as a mapping). ``init`` "teacher" starts from the teacher's kept
    weights (families derived from the teacher's graph only), "scratch" from a fresh initialisation; empty: the
    first the family allows. The default is the teacher itself, pruned and quantized as the other sections say.
    Its family fills in ``init`` and every ``config`` field (``autocomp.compress.student.resolved``)."""

    family: str = "teacher"
    config: dict[str, Any] = field(default_factory=dict)
    init: str = ""

    def __post_init__(self) -> None:
        check_choice("init", self.init, ("", *INITS))

    @property
    def scratch(self) -> bool:
        """Learns from fresh weights: nothing of the teacher's to recover, all to learn."""
        return self.init == "scratch"


@dataclass
class Prune:
    """Pruning: which channels (``granularity`` "channel") or single weights ("weight") go.

    Channels go per pruning group: layers whose channels are tied one-to-one (the two inputs of a residual
    add, a depthwise convolution and the layer feeding it; ``autocomp.compress.groups``) lose the same
    channels. ``local``: each entry of ``layers`` removes round(sparsity x channels) of its group's channels
    (of a layer's single weights at granularity "weight"); a group is named once, by any one of its members,
    so naming a second member of the same group is an error (single weights are per layer: no such rule).
    ``global``: ``sparsity`` of all prunable channels (weights) goes, the lowest by ``criterion`` across
    groups (channel scores normalised by their group's mean), each group (layer) keeping at least
    ``min_keep`` (the guard against layer collapse). A group a grouped convolution reads loses channels in
    multiples of its number of groups. ``rounds`` > 1 prunes iteratively, the
    fine-tune epochs split between rounds; ``bn_penalty`` adds L1 on BatchNorm scales to the
    fine-tune loss (network slimming). Removed channels leave the model; removed weights are
    masked to zero and the artifact stores them sparsely (bitmask + kept codes). ``regrow`` (weights only) is
    sparse training: after each fine-tune epoch that share of the kept weights with the lowest
    magnitude is dropped and as many pruned ones regrow at random (SET, Mocanu et al., 2018).
    ``drop_blocks`` first removes that many whole residual blocks, those whose branch adds least:
    submodules whose forward adds their input to a computed branch, output shaped as input
    (``Residual``, a BasicBlock without downsample; see ``autocomp.compress.blocks``). ``heads`` then removes
    that share of every attention module's heads, whole heads, the lowest L1 norm first, at least one kept
    (``nn.MultiheadAttention`` becomes its Linear-based equivalent; ``autocomp.compress.heads``). ``init`` "rewind"
    (lottery-ticket rewinding; single weights of the teacher itself) resets the kept weights to the teacher's early
    checkpoint (``Task.early_teacher``) after every pruning round, masks kept, before its fine-tune; "trained" keeps
    them as trained.
    """

    scope: str = "local"
    granularity: str = "channel"
    layers: dict[str, LayerPrune] = field(default_factory=dict)
    sparsity: float = 0.0
    criterion: str = "l1"
    min_keep: float = 0.1
    rounds: int = 1
    regrow: float = 0.0
    bn_penalty: float = 0.0
    drop_blocks: int = 0
    heads: float = 0.0
    init: str = "trained"

    def __post_init__(self) -> None:
        check_choice("scope", self.scope, SCOPES)
        check_choice("init", self.init, PRUNE_INITS)
        if self.init == "rewind" and (self.granularity != "weight" or self.heads > 0):
            raise ConfigError(f"'rewind' keeps the network's shape, so needs granularity 'weight' and no heads "
                              f"removed, but got granularity {self.granularity!r}, heads {self.heads}.", "init")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_range("regrow", self.regrow, 0.0, 0.5)
        check_range("drop_blocks", self.drop_blocks, 0, 1000)
        check_range("heads", self.heads, 0.0, 1.0, high_open=True)
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_range("min_keep", self.min_keep, 0.0, 1.0)
        check_range("rounds", self.rounds, 1, 100)
        check_range("bn_penalty", self.bn_penalty, 0.0, 1.0)


@dataclass
class Quantize:
    """Weights of ``bits`` (32 fp32, 16 fp16, 2-8 integer) and activations of ``activation_bits`` (32 or 8).

    A layer with 8-bit weights and 8-bit activations runs on real int8 kernels (static int8), its
    activations calibrated by ``calibration``; ``activation_bits`` 8 makes that every layer's default
    (and needs ``bits`` 8). The other layers keep fp32 activations and store their weights packed:
    min-max ``symmetric`` or asymmetric grid, ``per_channel`` or per tensor, or ``kmeans`` weight
    sharing. ``layers`` gives single layers their own weight bits and ``activation_layers`` their own
    activation bits (mixed precision); a layer whose weights are not 8 bits has fp32 activations.
    ``qat`` fine-tunes with the quantizers in place (quantization-aware training); otherwise the
    model is quantized after training (PTQ).
    """

    activation_bits: int = 32
    bits: int = 32
    symmetric: bool = True
    per_channel: bool = False
    calibration: str = "minmax"
    qat: bool = False
    kmeans: bool = False
    layers: dict[str, int] = field(default_factory=dict)
    activation_layers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, BITS)
        for name, bits in self.layers.items():
            check_choice(f"layers.{name}", bits, BITS)
        check_choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        for name, bits in self.activation_layers.items():
            check_choice(f"activation_layers.{name}", bits, ACTIVATION_BITS)
            if bits == 8 and self.bits_of(name) != 8:
                raise ConfigError(f"8 (int8 kernels) needs 8-bit weights, but the layer's weights have "
                                  f"{self.bits_of(name)} bits.", f"activation_layers.{name}")

    def bits_of(self, layer: str) -> int:
        return self.layers.get(layer, self.bits)

    def activation_bits_of(self, layer: str) -> int:
        """8 where the layer runs on int8 kernels, else 32."""
        return 32 if self.bits_of(layer) != 8 else self.activation_layers.get(layer, self.activation_bits)


@dataclass
class Distill:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) + weight * the ``kind``'s transfer term.

    ``kind`` "logits" is the soft-target term alone, "none" is cross-entropy alone. ``mode`` is where the soft
    targets come from and what trains beside the student (``autocomp.compress.modes``): "offline" the task's
    teacher; "multi_teacher" the mean of its and the extra ``teachers``' (task entry points on the same data, besides
    ``Task.teachers``); "born_again" ``generations`` students in turn, each the next one's teacher; "mutual" the
    student's ``peers`` (its architecture, freshly initialised), trained with it; "self" the student's own deepest
    output, taught to classifiers on its shallower layers; "assistant" the ``assistant`` student (default: the
    teacher's graph at half width), distilled from the teacher first for ``assistant_epochs``. A field of one mode
    is left at its default in the others (``autocomp.methods.check_recipe``).
    """

    mode: str = "offline"
    kind: str = "logits"
    alpha: float = 0.5
    temperature: float = 4.0
    weight: float = 1.0
    teachers: list[str] = field(default_factory=list)
    generations: int = 2
    peers: int = 1
    assistant: Student | None = None
    assistant_epochs: int = 10

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.05, 100.0)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("weight", self.weight, 0.0, 1e6)
        check_range("generations", self.generations, 1, 100)
        check_range("peers", self.peers, 1, 100)
        check_range("assistant_epochs", self.assistant_epochs, 1, 1000)


@dataclass
class FineTune:
    """``epochs`` of fine-tuning in all, split over the pruning rounds (``schedule``).

    ``patience`` > 0 stops a round's fine-tune once the validation metric (the task's, top-1 accuracy by default)
    has not improved for ``patience`` epochs, and keeps the weights of its best epoch
    (``autocomp.train.EarlyStopping``); 0: every epoch runs.
    """

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 0

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 0, 1000)
        check_range("lr", self.lr, 1e-7, 1.0)
        check_range("batch_size", self.batch_size, 1, 65536)
        check_range("patience", self.patience, 0, 1000)

    def schedule(self, rounds: int) -> list[int]:
        """Epochs after each of ``rounds`` pruning rounds: as even as whole epochs allow, earlier rounds
        first (5 epochs over 2 rounds: [3, 2])."""
        return [self.epochs // rounds + (r < self.epochs % rounds) for r in range(rounds)]


@dataclass
class Measure:
    """How latency is measured (``autocomp.latency``): at the deployed batch size and thread count, through
    ``sessions`` ONNX Runtime sessions per artifact, after ``warmup_seconds`` of warm-up, in blocks interleaved with
    the teacher's artifact for at least ``rounds`` rounds per session and ``min_seconds`` (at most ``max_seconds``)
    and until the 95% interval of the latency ratio is within ``tolerance`` of it, or ``max_seconds`` have
    passed."""

    batch_size: int = 1
    threads: int = 1
    warmup_seconds: float = 1.0
    tolerance: float = 0.02
    max_seconds: float = 10.0
    min_seconds: float = 5.0  # spans the phases of a shared machine (README "How latency is measured")
    sessions: int = 4  # sessions of one model run a few percent apart for as long as they live: averaged over
    rounds: int = 7

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1, 65536)
        check_range("threads", self.threads, 1, 1024)
        check_range("warmup_seconds", self.warmup_seconds, 0.0, 600.0)
        check_range("tolerance", self.tolerance, 0.001, 0.5)
        check_range("max_seconds", self.max_seconds, 0.1, 3600.0)
        check_range("min_seconds", self.min_seconds, 0.0, 3600.0)
        check_range("sessions", self.sessions, 1, 64)
        check_range("rounds", self.rounds, 3, 10000)


@dataclass
class Recipe:
    """Everything ``apply`` needs to rebuild one compressed model of ``task``."""

    task: str
    student: Student = field(default_factory=Student)
    prune: Prune = field(default_factory=Prune)
    quantize: Quantize = field(default_factory=Quantize)
    distill: Distill = field(default_factory=Distill)
    finetune: FineTune = field(default_factory=FineTune)
    measure: Measure = field(default_factory=Measure)
    seed: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # rules across fields; each field is checked by its own section
        p, q = self.prune, self.quantize
        if p.regrow > 0 and p.granularity != "weight":
            raise ConfigError(f"regrows single weights, so needs granularity 'weight', but got {p.granularity!r}.",
                              "prune.regrow")
        if q.activation_bits == 8 and q.bits != 8:
            raise ConfigError(f"8 (static int8) needs bits 8, but got bits {q.bits}.", "quantize.activation_bits")
        if q.qat and not qat_allowed(q.bits):
            raise ConfigError(f"needs integer weights (bits 2-8), but got bits {q.bits}.", "quantize.qat")
        least = least_epochs(p.rounds, q.qat)
        if self.finetune.epochs < least:
            needs = [f"one for each of the {p.rounds} pruning rounds (prune.rounds)"] * (p.rounds > 1) + [
                "one to train with the quantizers in place (quantize.qat)"] * q.qat
            raise ConfigError(f"must be >= {least}, {' and '.join(needs)}, but got {self.finetune.epochs}.",
                              "finetune.epochs")
        if q.kmeans and not kmeans_allowed(q.bits, q.activation_bits, q.qat):
            raise ConfigError(f"needs weight-only integer bits (2-8, activation_bits 32, no qat), but got bits "
                              f"{q.bits}, activation_bits {q.activation_bits}, qat {q.qat}.", "quantize.kmeans")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **to_dict(self)}

    def canonical(self) -> str:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        check_schema_version(data, SCHEMA_VERSION, "recipe")
        return from_dict(cls, {k: v for k, v in data.items() if k != "schema_version"}, "recipe")

    def save(self, path: str | Path) -> None:
        write_yaml(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        with in_file(path):
            return cls.from_dict(read_yaml(path, "recipe"))


# fields added since recipes were first stored: left out of the canonical text where they hold their defaults, so a
# recipe keeps the key it was stored under (a resumed study's duplicate check)
ADDED = {"distill": ("mode", "teachers", "generations", "peers", "assistant", "assistant_epochs"), "prune": ("init",)}


def canonical(data: dict[str, Any]) -> str:
    """What a recipe (as ``Recipe.to_dict`` writes it) builds, as text two equal recipes share: every field but the
    provenance, floats to 9 significant digits (a sampler's 0.0010000000000000002 is 0.001), the ``ADDED`` fields
    only where they differ from their defaults."""
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.9g}")
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return [rounded(v) for v in value] if isinstance(value, list) else value

    defaults = {"distill": to_dict(Distill()), "prune": to_dict(Prune())}

    def known(section: str, value: Any) -> Any:
        if section not in ADDED:
            return value
        return {k: v for k, v in value.items() if k not in ADDED[section] or v != defaults[section][k]}

    return json.dumps(rounded({k: known(k, v) for k, v in data.items() if k != "provenance"}), sort_keys=True)
