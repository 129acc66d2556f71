"""Knowledge distillation for the fine-tune: the loss and its transfer terms.

A feature term compares the outputs of paired student and teacher layers (the same named layers when the
student is the pruned teacher, else layers at the same relative depth; widths may differ, and positions are
pooled to the coarser of the two where they differ), a relational term compares the embeddings that enter each
model's classifier head, an attention term the attention maps of the transformer layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from autocomp.compress.blocks import residual_blocks
from autocomp.compress.heads import HeadAttention
from autocomp.features import Hooks, Tap, head_layer
from autocomp.registry import Registry


class Transfer(nn.Module, ABC):
    """A knowledge-transfer term between student and teacher features of one batch.

    Each transfer names the (student, teacher) layer pairs it compares (``layer_pairs``; by default the hint layers
    the pipeline pairs) and records their features (``recorders``; by default the layers' outputs, channels first:
    the (B, tokens, C) output of a Linear or transformer layer reads as (B, C, tokens)).
    """

    channels_first: ClassVar[bool] = True  # move a channels-last layer's channels to dimension 1

    def layer_pairs(self, student: nn.Module, teacher: nn.Module, example_input: Tensor,
                    hints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return list(hints)

    def recorders(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]) -> list:
        """What records the student's and the teacher's features of ``pairs`` on each forward pass."""
        return [Tap(student, [s for s, _ in pairs]), Tap(teacher, [t for _, t in pairs])]

    def build(self, student: list[Tensor], teacher: list[Tensor]) -> None:
        """Create any learned parts (projections) from one batch of example features."""

    @abstractmethod
    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor: ...


TRANSFERS: Registry[type[Transfer] | None] = Registry("distillation kind")
TRANSFERS.add("none", None, "no teacher: fine-tune on the labels alone (cross-entropy)")
TRANSFERS.add("logits", None, "soft targets: T^2 * KL of temperature-softened outputs (Hinton et al., 2015)")


@TRANSFERS.register("fitnet", "feature hints: MSE to the teacher's layer outputs through a learned "
                              "1x1 projection where widths differ (Romero et al., ICLR 2015)")
class FitNet(Transfer):
    def build(self, student: list[Tensor], teacher: list[Tensor]) -> None:
        self.projections = nn.ModuleList(_projection(s, t) for s, t in zip(student, teacher, strict=True))

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        terms = [nn.functional.mse_loss(p(s), t) for p, s, t in zip(self.projections, student, teacher, strict=True)]
        return torch.stack(terms).mean() if terms else torch.zeros(())


def _projection(student: Tensor, teacher: Tensor) -> nn.Module:
    c_in, c_out = student.shape[1], teacher.shape[1]
    if c_in == c_out:
        return nn.Identity()
    if student.dim() == 2:
        return nn.Linear(c_in, c_out, bias=False)
    conv = nn.Conv1d if student.dim() == 3 else nn.Conv2d
    return conv(c_in, c_out, kernel_size=1, bias=False)


def attention_map(features: Tensor) -> Tensor:
    """Spatial attention: the channel mean of squared activations, flattened and L2-normalised.

    (B, C, *spatial) -> (B, prod(spatial)); Zagoruyko & Komodakis, ICLR 2017.
    """
    return nn.functional.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


@TRANSFERS.register("attention", "attention transfer: match the spatial attention maps of conv layers "
                                 "(Zagoruyko & Komodakis, ICLR 2017)")
class AttentionTransfer(Transfer):
    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        terms = [(attention_map(s) - attention_map(t)).pow(2).sum(1).mean()
                 for s, t in zip(student, teacher, strict=True) if s.dim() > 2]
        return torch.stack(terms).mean() if terms else student[0].new_zeros(())


def _distances(e: Tensor) -> Tensor:
    d = torch.cdist(e, e)  # (B, B)
    return d / d[d > 0].mean().clamp_min(1e-12)


def _angles(e: Tensor) -> Tensor:
    diff = nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # (B, B, D): unit e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of the angle at each vertex i


@TRANSFERS.register("rkd", "relational KD: match pairwise distances and triplet angles of the "
                           "embeddings (Park et al., CVPR 2019)")
class RelationalKD(Transfer):
    channels_first = False

    def layer_pairs(self, student: nn.Module, teacher: nn.Module, example_input: Tensor,
                    hints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(head_layer(student, example_input), head_layer(teacher, example_input))]

    def recorders(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]) -> list:
        """The embeddings: the (B, D) inputs of the heads."""
        return [Tap(student, [s for s, _ in pairs], inputs=True), Tap(teacher, [t for _, t in pairs], inputs=True)]

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        s, t = student[0].flatten(1), teacher[0].flatten(1)
        distance = nn.functional.smooth_l1_loss(_distances(s), _distances(t))
        angle = nn.functional.smooth_l1_loss(_angles(s), _angles(t))
        return distance + 2.0 * angle  # the paper's 25:50 weighting


def similarity(features: Tensor) -> Tensor:
    """Row-normalised batch similarity G = F F^T of flattened features: (B, ...) -> (B, B)."""
    f = features.flatten(1)
    return nn.functional.normalize(f @ f.T, dim=1)


@TRANSFERS.register("sp", "similarity-preserving: match the batch similarity matrices of layer "
                          "outputs (Tung & Mori, ICCV 2019)")
class SimilarityPreserving(Transfer):
    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        b = student[0].shape[0]
        terms = [(similarity(s) - similarity(t)).pow(2).sum() / b**2 for s, t in zip(student, teacher, strict=True)]
        return torch.stack(terms).mean()


def attention_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, HeadAttention))]


class AttentionMaps(Hooks):
    """Records the attention probabilities (batch, heads, queries, keys) of each attention module of ``model``
    (``nn.MultiheadAttention``, ``HeadAttention``) on every forward pass: the module runs once more on its own
    inputs and masks with ``need_weights``, per head (in training mode with attention dropout, the weights
    after dropout)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = attention_modules(model)
        self.values: dict[str, Tensor] = {}
        self._busy = False
        self._hooks = [model.get_submodule(n).register_forward_hook(self._recorder(n), with_kwargs=True)
                       for n in self.names]

    def _recorder(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, _output) -> None:
            if self._busy:  # the call below
                return
            self._busy = True
            try:
                kwargs = {**kwargs, "need_weights": True, "average_attn_weights": False}
                self.values[name] = module(*args, **kwargs)[1]
            finally:
                self._busy = False

        return record

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@TRANSFERS.register("attention_matrix", "transformers: the squared difference of every nn.MultiheadAttention's "
                                        "attention maps, mean over heads (TinyBERT, Jiao et al., 2020); nothing "
                                        "on a model without one")
class AttentionMatrix(Transfer):
    """Per layer pair, sum over keys of (A_student - A_teacher)^2, mean over batch, heads and queries; layers are
    paired by relative depth, and maps with other head counts are compared averaged over heads."""

    channels_first = False

    def layer_pairs(self, student: nn.Module, teacher: nn.Module, example_input: Tensor,
                    hints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return by_depth(attention_modules(student), attention_modules(teacher))

    def recorders(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]) -> list:
        return [AttentionMaps(student), AttentionMaps(teacher)]

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        terms = [(s - t if s.shape == t.shape else s.mean(1) - t.mean(1)).pow(2).sum(-1).mean()
                 for s, t in zip(student, teacher, strict=True)]
        return torch.stack(terms).mean() if terms else torch.zeros(())


@TRANSFERS.register("hidden", "hidden states: MSE to the teacher's transformer layer (else residual block) "
                             "outputs through a learned projection where widths differ (TinyBERT, Jiao et al., 2020)")
class HiddenStates(FitNet):
    def layer_pairs(self, student: nn.Module, teacher: nn.Module, example_input: Tensor,
                    hints: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return by_depth(hidden_layers(student, example_input), hidden_layers(teacher, example_input))


def aligned(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Features (B, C, *positions) of both models over the same positions: unchanged where they already agree;
    else a side without positions (B, C) meets the other's mean over positions, and otherwise both are flattened
    to (B, C, P) and the finer one is average-pooled to the coarser one's P."""
    if student.shape[2:] == teacher.shape[2:]:
        return student, teacher
    if student.dim() == 2 or teacher.dim() == 2:
        return tuple(f.flatten(2).mean(2) if f.dim() > 2 else f for f in (student, teacher))
    student, teacher = student.flatten(2), teacher.flatten(2)
    p = min(student.shape[2], teacher.shape[2])
    return nn.functional.adaptive_avg_pool1d(student, p), nn.functional.adaptive_avg_pool1d(teacher, p)


CHANNELS_LAST = (nn.Linear, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # outputs (..., C)


def hidden_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """The modules whose outputs are the model's hidden states: its transformer layers, else its residual blocks."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.TransformerEncoderLayer,
                                                                    nn.TransformerDecoderLayer))]
    return layers or residual_blocks(model, example_input)


def by_depth(student: list[str], teacher: list[str]) -> list[tuple[str, str]]:
    """Pairs of student and teacher layers at the same relative depth (each student layer once)."""
    if not student or not teacher:
        return []
    last = max(len(student) - 1, 1)
    return [(s, teacher[round(i * (len(teacher) - 1) / last)]) for i, s in enumerate(student)]


class Targets(ABC):
    """Where a distillation's soft targets come from: their log-probabilities at temperature ``t`` for a batch ``x``
    (rows ``idx`` of the training split, where the fine-tune knows them)."""

    @abstractmethod
    def log_probs(self, x: Tensor, idx: Tensor | None, t: float) -> Tensor:
        """(B, classes) log-probabilities, without gradients."""


class TeacherTargets(Targets):
    """One teacher's softened outputs (Hinton et al., 2015): read by index from ``logits``, its logits on the training
    split (``Task.teacher_logits``), where given, else the teacher run on the batch."""

    def __init__(self, teacher: nn.Module, logits: Tensor | None = None) -> None:
        self.teacher, self.logits = teacher, logits

    def log_probs(self, x: Tensor, idx: Tensor | None, t: float) -> Tensor:
        if self.logits is not None and idx is not None:
            logits = self.logits[idx]
        else:
            with torch.no_grad():
                logits = self.teacher(x)
        return nn.functional.log_softmax(logits / t, dim=1)


def mean_softened(log_probs: list[Tensor]) -> Tensor:
    """The log of the mean of the distributions whose log-probabilities ``log_probs`` holds."""
    return torch.logsumexp(torch.stack(log_probs), dim=0) - torch.log(torch.tensor(float(len(log_probs))))


def divergence(logits: Tensor, targets: Tensor, t: float) -> Tensor:
    """KL(targets || softmax(logits / T)) over a batch, ``targets`` log-probabilities at temperature T."""
    return nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=1), targets, reduction="batchmean",
                                log_target=True)


def soft_loss(logits: Tensor, targets: Tensor, y: Tensor, alpha: float, t: float) -> Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(targets || softmax(logits / T)): the T^2 factor keeps the soft term's
    gradient scale independent of the temperature (Hinton et al., 2015)."""
    return (1.0 - alpha) * nn.functional.cross_entropy(logits, y) + alpha * t**2 * divergence(logits, targets, t)


class EnsembleTargets(Targets):
    """Multi-teacher distillation: the mean of the teachers' softened outputs (an ensemble's soft targets, Hinton et
    al., 2015), each teacher's read as ``TeacherTargets`` reads one."""

    def __init__(self, teachers: list[TeacherTargets]) -> None:
        if not teachers:
            raise ValueError("an ensemble's soft targets need at least one teacher")
        self.teachers = teachers

    def log_probs(self, x: Tensor, idx: Tensor | None, t: float) -> Tensor:
        return mean_softened([teacher.log_probs(x, idx, t) for teacher in self.teachers])


class Distiller(nn.Module, Hooks):
    """The fine-tune loss: (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) + weight * transfer.

    The T^2 factor keeps the soft term's gradient scale independent of the temperature (Hinton
    et al., 2015). ``kind`` "none" is cross-entropy alone. Hooks on the student record its
    features during the training forward pass. The soft targets are ``targets``' (default: the teacher's,
    ``TeacherTargets``): the teacher runs here, without gradients, unless ``teacher_logits`` holds its logits on the
    training split (``Task.teacher_logits``) and no feature term needs its forward pass: then a batch's soft targets
    are read by index (the fine-tune does not augment, so a batch's inputs are the split's).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, example_input: Tensor, *, kind: str = "logits",
                 temperature: float = 4.0, alpha: float = 0.5, weight: float = 1.0,
                 pairs: list[tuple[str, str]] = (),
                 teacher_logits: Tensor | None = None, targets: Targets | None = None) -> None:
        super().__init__()
        teacher.eval()  # not a sub-module: its weights are not trained
        self.temperature, self.alpha, self.weight = temperature, (0.0 if kind == "none" else alpha), weight
        cls = TRANSFERS.get(kind, field="distill.kind")
        self.transfer = cls() if cls is not None else None
        self._taps: list[Tap | AttentionMaps] = []
        if self.transfer is not None:
            self._pairs = self.transfer.layer_pairs(student, teacher, example_input, list(pairs))
            self._taps = self.transfer.recorders(student, teacher, self._pairs)
            moved = self.transfer.channels_first
            self._last = ([moved and isinstance(student.get_submodule(s), CHANNELS_LAST) for s, _ in self._pairs],
                          [moved and isinstance(teacher.get_submodule(t), CHANNELS_LAST) for _, t in self._pairs])
            with torch.no_grad():
                student.eval()(example_input.repeat(2, *[1] * (example_input.dim() - 1)))
                teacher(example_input.repeat(2, *[1] * (example_input.dim() - 1)))
            self.transfer.build(*self._features())
        # a feature term records the teacher's features in its forward pass: the teacher runs on every batch then
        self.targets = targets or TeacherTargets(teacher, teacher_logits if self.transfer is None else None)

    def _features(self) -> tuple[list[Tensor], list[Tensor]]:
        """Each pair's student and teacher features, channels first: (B, C, *positions), so the (B, tokens, C)
        output of a Linear or transformer layer reads as (B, C, tokens), like a Conv1d's; positions aligned."""
        (student, teacher), (s_last, t_last) = (tap.values for tap in self._taps), self._last

        def first(f: Tensor, channels_last: bool) -> Tensor:
            return f.movedim(-1, 1) if channels_last and f.dim() > 2 else f

        pairs = [aligned(first(student[s], sl), first(teacher[t], tl))
                 for (s, t), sl, tl in zip(self._pairs, s_last, t_last, strict=True)]
        return [s for s, _ in pairs], [t for _, t in pairs]

    def forward(self, student_logits: Tensor, x: Tensor, y: Tensor, idx: Tensor | None = None) -> Tensor:
        if self.alpha == 0.0 and self.transfer is None:
            return nn.functional.cross_entropy(student_logits, y)
        t = self.temperature
        loss = soft_loss(student_logits, self.targets.log_probs(x, idx, t), y, self.alpha, t)
        if self.transfer is not None:
            loss = loss + self.weight * self.transfer(*self._features())
        return loss

    def close(self) -> None:
        """Remove the hooks (the teacher is shared across trials)."""
        for tap in self._taps:
            tap.close()
