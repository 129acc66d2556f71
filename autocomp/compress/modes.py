"""Distillation modes: where a student's soft targets come from, and what trains beside it.

A mode runs the pipeline's compression (``Compress``: restructure, prune and fine-tune in rounds, the one path of
``autocomp.pipeline``) once or more, each time with a ``Lesson``: what a fine-tune learns from. "offline" is one
pass from the task's teacher; the others are the lectures' variants (``MODES``, listed by ``autocomp methods``).
Every mode composes with quantization-aware training, whose quantizers wrap the student inside the same fine-tune.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from autocomp.compress import distill as distill_module
from autocomp.compress.distill import (
    CHANNELS_LAST,
    Distiller,
    EnsembleTargets,
    TeacherTargets,
    divergence,
    mean_softened,
    soft_loss,
)
from autocomp.compress.student import build_student, resolved
from autocomp.errors import ConfigError
from autocomp.features import Hooks, Tap
from autocomp.recipe import Distill, FineTune, Recipe, Student
from autocomp.registry import Registry
from autocomp.train import deterministic, fit, predict

if TYPE_CHECKING:
    from autocomp.tasks.base import Task


@dataclass
class Trained:
    """A compressed student, trained, and the epochs each pruning round's fine-tune ran."""

    model: nn.Module
    epochs: list[int]


class Lesson(ABC):
    """What one fine-tune learns from: the loss it trains ``student`` with (a module, so ``train.fit`` trains its
    own parameters too; a context manager that removes its hooks on leaving)."""

    @abstractmethod
    def loss(self, student: nn.Module, task: Task, spec: Distill, pairs: list[tuple[str, str]]) -> Hooks: ...


# compress(recipe, lesson, generation) -> the recipe's student compressed and trained on the lesson (the
# pipeline's rounds); generation g > 0 draws its seeds apart from the first
Compress = Callable[[Recipe, Lesson, int], Trained]


class FromTeacher(Lesson):
    """Offline distillation from ``teacher`` (``Distiller``): its soft targets, read from ``logits`` (its logits on
    the training split) where given and no feature term needs its forward pass, or ``targets`` where given."""

    def __init__(self, teacher: nn.Module, logits: Tensor | None = None,
                 targets: distill_module.Targets | None = None) -> None:
        self.teacher, self.logits, self.targets = teacher, logits, targets

    def loss(self, student: nn.Module, task: Task, spec: Distill, pairs: list[tuple[str, str]]) -> Hooks:
        return Distiller(self.teacher, student, task.example_input, kind=spec.kind, temperature=spec.temperature,
                         alpha=spec.alpha, weight=spec.weight, pairs=pairs,
                         teacher_logits=self.logits if spec.kind != "none" else None, targets=self.targets)


def mean_soft(logits: list[Tensor], t: float) -> Tensor:
    """Log of the mean of softmax(z / T) over ``logits``, without gradients."""
    return mean_softened([nn.functional.log_softmax(z.detach() / t, dim=1) for z in logits])


class Cohort(nn.Module, Hooks):
    """Deep mutual learning (Zhang et al., CVPR 2018): the student's ``peers`` run on its batches and train with it
    (their parameters are this loss's, which ``train.fit`` trains); each network's loss is the paper's, its whole
    cross-entropy plus alpha * T^2 * KL to the mean of the others' softened outputs (alpha weighs the peers, never
    the labels away). The peers stay in training mode; only the student is kept."""

    def __init__(self, peers: list[nn.Module], spec: Distill) -> None:
        super().__init__()
        self.peers, self.spec = nn.ModuleList(peers).train(), spec

    def forward(self, logits: Tensor, x: Tensor, y: Tensor, idx: Tensor | None = None) -> Tensor:
        every, t = [logits, *(peer(x) for peer in self.peers)], self.spec.temperature
        return sum(nn.functional.cross_entropy(z, y) + self.spec.alpha * t**2 * divergence(
            z, mean_soft(every[:i] + every[i + 1:], t), t) for i, z in enumerate(every))

    def close(self) -> None:
        pass


class Mutual(Lesson):
    """The student learns with ``peers`` (``Cohort``), the same peers across pruning rounds."""

    def __init__(self, peers: list[nn.Module]) -> None:
        self.peers = peers

    def loss(self, student: nn.Module, task: Task, spec: Distill, pairs: list[tuple[str, str]]) -> Hooks:
        return Cohort(self.peers, spec)


def pooled(features: Tensor, channels_last: bool) -> Tensor:
    """(B, C) from a layer's output: positions (tokens of a channels-last layer) averaged away."""
    if features.dim() == 2:
        return features
    return features.mean(dim=tuple(range(1, features.dim() - 1))) if channels_last else features.flatten(2).mean(2)


class SelfTaught(nn.Module, Hooks):
    """Self-distillation ("Be Your Own Teacher", Zhang et al., ICCV 2019): a linear classifier on each of ``layers``
    (shallower layers of the student, their outputs pooled over positions) learns ``soft_loss`` to the student's
    own deepest output; the student's output learns from the labels. The classifiers are this loss's parameters
    (trained by ``train.fit``), never the student's: the artifact does not hold them. No teacher runs."""

    def __init__(self, student: nn.Module, example_input: Tensor, layers: list[str], spec: Distill) -> None:
        super().__init__()
        self.spec, self.layers = spec, layers
        self._last = [isinstance(student.get_submodule(n), CHANNELS_LAST) for n in layers]
        self._tap = Tap(student, layers)
        with torch.no_grad():
            classes = student.eval()(example_input.repeat(2, *[1] * (example_input.dim() - 1))).shape[1]
        self.heads = nn.ModuleList(nn.Linear(f.shape[1], classes) for f in self.features())

    def features(self) -> list[Tensor]:
        return [pooled(self._tap.values[n], last) for n, last in zip(self.layers, self._last, strict=True)]

    def forward(self, logits: Tensor, x: Tensor, y: Tensor, idx: Tensor | None = None) -> Tensor:
        own = mean_soft([logits], self.spec.temperature)  # the deepest output's soft targets, without gradients
        shallow = [soft_loss(head(f), own, y, self.spec.alpha, self.spec.temperature)
                   for head, f in zip(self.heads, self.features(), strict=True)]
        return nn.functional.cross_entropy(logits, y) + sum(shallow)

    def close(self) -> None:
        self._tap.close()


SHALLOW = 3  # classifiers a self-distilled student learns on, at most: spread over its shallower hint layers


class Self(Lesson):
    """The student teaches classifiers on its shallower hint layers (``SelfTaught``): up to ``SHALLOW`` of them,
    evenly spread over every hint layer but the deepest."""

    @staticmethod
    def check(pairs: list[tuple[str, str]]) -> None:
        """A ConfigError naming ``recipe.distill.mode`` unless the student has a hint layer below its deepest."""
        if len(dict.fromkeys(s for s, _ in pairs)) < 2:
            raise ConfigError(f"'self' needs a student with at least two hint layers (prunable Conv/Linear layers), "
                              f"to teach the shallower from its own output, but got {len(pairs)}.",
                              "recipe.distill.mode")

    def loss(self, student: nn.Module, task: Task, spec: Distill, pairs: list[tuple[str, str]]) -> Hooks:
        self.check(pairs)
        shallower = list(dict.fromkeys(s for s, _ in pairs))[:-1]
        count = min(SHALLOW, len(shallower))
        chosen = [shallower[round(k * (len(shallower) - 1) / max(count - 1, 1))] for k in range(count)]
        return SelfTaught(student, task.example_input, list(dict.fromkeys(chosen)), spec)


@dataclass(frozen=True)
class Mode:
    """A registered distillation mode: ``run(recipe, task, compress, teachers)`` returns the trained student
    (``teachers``: the extra teacher models, ``Task.teachers`` and ``distill.teachers``); ``kinds`` the distillation
    kinds it combines with (None: every one); ``unmet(recipe, task, teachers)`` what it lacks to run, or None;
    ``check_hints(pairs)`` refuses a student whose hint layers (``pipeline.distillation_pairs``) it cannot use."""

    run: Callable[[Recipe, Task, Compress, list[nn.Module]], Trained]
    kinds: tuple[str, ...] | None = ("logits",)
    unmet: Callable[[Recipe, Task, list[nn.Module]], str | None] = lambda recipe, task, teachers: None
    check_hints: Callable[[list[tuple[str, str]]], None] = lambda pairs: None


MODES: Registry[Mode] = Registry("distillation mode")


def combines(mode: str, kind: str) -> bool:
    """Whether distillation ``mode`` takes the loss ``kind``."""
    kinds = MODES.get(mode, field="distill.mode").kinds
    return kinds is None or kind in kinds


def logits_of(model: nn.Module, task: Task) -> Tensor:
    """``model``'s logits on the training split, in order (a teacher's, read by index by ``TeacherTargets``)."""
    with deterministic():
        return predict(model, task.train.x)


def from_task_teacher(recipe: Recipe, task: Task) -> FromTeacher:
    """Offline distillation from the task's teacher, its logits on the training split read by index."""
    return FromTeacher(task.teacher, task.teacher_logits() if recipe.distill.kind != "none" else None)


def offline(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    return compress(recipe, from_task_teacher(recipe, task), 0)


MODES.add("offline", Mode(offline, kinds=None), "a fixed teacher, one student: the task's teacher's soft targets and "
                                                "the kind's transfer term. Lecture: knowledge distillation (Hinton "
                                                "et al., 2015)")


def multi_teacher(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    ensemble = EnsembleTargets([TeacherTargets(task.teacher, task.teacher_logits()),
                                *(TeacherTargets(t, logits_of(t, task)) for t in teachers)])
    return compress(recipe, FromTeacher(task.teacher, targets=ensemble), 0)


def needs_teachers(recipe: Recipe, task: Task, teachers: list[nn.Module]) -> str | None:
    return None if teachers else ("needs extra teachers (Task.teachers, or distill.teachers naming task entry points "
                                  "on the same data), but the task gives none")


MODES.add("multi_teacher", Mode(multi_teacher, unmet=needs_teachers),
          "the mean of the softened outputs of the task's teacher and its extra teachers (Task.teachers, "
          "distill.teachers). Lecture: multi-teacher distillation, an ensemble's soft targets (Hinton et al., 2015)")


GENERATION_SEEDS = 1000  # generation g's seeds start at recipe.seed + g * GENERATION_SEEDS


def born_again(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    lesson: Lesson = from_task_teacher(recipe, task)
    for generation in range(recipe.distill.generations):
        trained = compress(recipe, lesson, generation)
        lesson = FromTeacher(trained.model, logits_of(trained.model, task))
    return trained


MODES.add("born_again", Mode(born_again),
          "distill.generations students of the recipe's in turn, the first from the teacher, each later one from "
          "the one before. Lecture: born-again networks (Furlanello et al., ICML 2018)")


def peers(recipe: Recipe, task: Task) -> list[nn.Module]:
    """The student's architecture, freshly initialised, ``distill.peers`` times (seeds after the recipe's)."""
    spec = dataclasses.replace(recipe.student, init="scratch")
    return [build_student(spec, task, seed=recipe.seed + k) for k in range(1, recipe.distill.peers + 1)]


def mutual(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    return compress(recipe, Mutual(peers(recipe, task)), 0)


MODES.add("mutual", Mode(mutual),
          "the student and distill.peers networks of its architecture train together, each on the others' softened "
          "outputs; no teacher. Lecture: online distillation, deep mutual learning (Zhang et al., CVPR 2018)")


def self_taught(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    return compress(recipe, Self(), 0)


MODES.add("self", Mode(self_taught, check_hints=Self.check),
          "classifiers on the student's shallower layers learn from its own deepest output (not exported); no "
          "teacher. Lecture: self-distillation (Zhang et al., ICCV 2019, Be Your Own Teacher)")


ASSISTANT = Student("teacher", {"width": 0.5})  # the default teacher assistant: the teacher's graph at half width


def assistant_recipe(recipe: Recipe) -> Recipe:
    """The recipe that trains ``recipe``'s teacher assistant: its ``distill.assistant`` student (default
    ``ASSISTANT``), distilled offline from the teacher for ``assistant_epochs`` with the defaults of distillation and
    of a fine-tune (alpha, temperature, learning rate, batch size), the recipe's seed, neither pruned nor quantized:
    none of a search's continuous dimensions, so one assistant serves every trial that shares it."""
    return Recipe(task=recipe.task, student=resolved(recipe.distill.assistant or ASSISTANT),
                  finetune=FineTune(epochs=recipe.distill.assistant_epochs), seed=recipe.seed)


def cached_assistant(recipe: Recipe, task: Task, compress: Compress) -> nn.Module:
    """The teacher assistant ``assistant_recipe`` trains, trained once and cached (``tasks.base.cached_model``) by its
    recipe, the task's teacher and data, and the source of the code that trains it (``compress``'s module, the
    distillation, student, pruning and training modules)."""
    from autocomp.tasks.base import cached_model, digest, source_digest, weights_digest

    helper = assistant_recipe(recipe)
    modules = [sys.modules[m] for m in (compress.__module__, __name__, distill_module.__name__,
                                        build_student.__module__, fit.__module__, "autocomp.compress.prune")]
    code = source_digest(modules)
    trains = (f"{helper.canonical()}|{weights_digest(task.teacher)}|"
              f"{digest(t for split in (task.train, task.val) for t in (split.x, split.y))}|{code}")
    name = re.sub(r"[^\w.-]", "_", f"{task.name}-assistant")
    return cached_model(name, build_student(helper.student, task, seed=helper.seed), trains, lambda model: (
        model.load_state_dict(compress(helper, from_task_teacher(helper, task), 0).model.state_dict())))


def assistant(recipe: Recipe, task: Task, compress: Compress, teachers: list[nn.Module]) -> Trained:
    helper = cached_assistant(recipe, task, compress)
    return compress(recipe, FromTeacher(helper, logits_of(helper, task)), 0)


MODES.add("assistant", Mode(assistant),
          "a mid-sized student (distill.assistant, default the teacher's graph at half width) distilled from the "
          "teacher first for distill.assistant_epochs, cached, then the student's teacher. Lecture: teacher "
          "assistants (Mirzadeh et al., AAAI 2020)")
