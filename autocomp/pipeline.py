"""apply(recipe, task): the one path from a Recipe to a measured, deployable artifact.

Search trials and ``autocomp apply`` both call :func:`apply`, so an exported recipe reproduces
its trial by construction.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from autocomp import phase, runtime
from autocomp.compress.blocks import drop_blocks
from autocomp.compress.distill import by_depth
from autocomp.compress.facts import ModelFacts, model_facts, teacher_facts
from autocomp.compress.heads import drop_heads, head_counts
from autocomp.compress.modes import GENERATION_SEEDS, MODES, Lesson, Mode, Trained, from_task_teacher
from autocomp.compress.prune import PrunableLayer, finalize_masks, prune, regrow, rewind
from autocomp.compress.qat import quantization_aware
from autocomp.compress.quantize import deploy
from autocomp.compress.student import build_student, family, is_teacher
from autocomp.errors import ConfigError
from autocomp.faults import FiniteLoss
from autocomp.features import layer_names
from autocomp.measure import macs_and_params, measure
from autocomp.methods import check_recipe
from autocomp.recipe import FineTune, Measure, Recipe
from autocomp.tasks.base import Task
from autocomp.train import EarlyStopping, fit

ARTIFACT, RECIPE = "model.onnx", "recipe.yaml"
CALIBRATION_SAMPLES = 256


def student_and_facts(recipe: Recipe, task: Task, seed: int | None = None) -> tuple[nn.Module, ModelFacts]:
    """The recipe's student, untrained, and the facts its prune section is checked against and counts from.

    The teacher itself (the default) reads the teacher's cached facts. A student of the teacher's graph keeps its
    layer names, so its recipe may name the teacher's layers (one in a dropped block is skipped); it is pruned
    against its own channels. Any other student is a new network: its recipe names its own layers.
    """
    if is_teacher(recipe.student):
        return copy.deepcopy(task.teacher), teacher_facts(task)
    student = build_student(recipe.student, task, seed=recipe.seed if seed is None else seed)
    facts = model_facts(student, task.example_input)
    if family(recipe.student.family).derived:
        teacher = teacher_facts(task)
        facts = dataclasses.replace(facts, prunable={**teacher.prunable, **facts.prunable}, layers=teacher.layers)
    return student, facts


def student_counts(recipe: Recipe, task: Task) -> dict[str, int]:
    """MACs and parameters of the recipe's student as built, before it is pruned or trained: what a study's caps
    on parameters and MACs are checked against before a trial trains (pruning only lowers them)."""
    model = copy.deepcopy(task.teacher) if is_teacher(recipe.student) else build_student(recipe.student, task)
    return macs_and_params(model, task.example_input)


@dataclass
class CompressedModel:
    model: nn.Module  # the pruned, fine-tuned fp32 torch model the artifact was made from
    artifact: Path  # the deployable ONNX file
    metrics: dict[str, float]  # measured on the artifact
    kernels: dict[str, int]  # the ONNX Runtime kernels one inference executes, with counts
    layer_kernels: dict[str, str]  # Conv/Linear layer -> the ONNX Runtime kernel that computes it
    fp32_layers: dict[str, str]  # layers the recipe puts on int8 kernels that stayed fp32 -> why
    seconds: dict[str, float]  # wall-clock time of each stage: compress (prune + fine-tune), deploy, measure
    epochs: list[int]  # epochs fine-tuned after each pruning round: the schedule's, fewer where one stopped early


def apply(recipe: Recipe, task: Task, out_dir: str | Path, progress: bool = True,
          reference: Path | None = None) -> CompressedModel:
    """Drop blocks -> prune -> distil/fine-tune (per round) -> export -> quantize -> measure, into ``out_dir``.

    Latency is timed side by side with the ``reference`` artifact (the teacher's), or alone without one.
    """
    recipe = check_recipe(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = [time.perf_counter()]
    mode, teachers = checked_mode(recipe, task)
    trained = mode.run(recipe, task, lambda r, lesson, generation: train_student(r, task, lesson, generation, progress),
                       teachers)
    student = trained.model
    finalize_masks(student)
    clock.append(time.perf_counter())
    phase.step("export and quantize")
    artifact = deploy(student, task.example_input, recipe.quantize, task.train.x[:CALIBRATION_SAMPLES].numpy(),
                      out_dir / ARTIFACT, sparse=recipe.prune.granularity == "weight")
    clock.append(time.perf_counter())
    phase.step("measure")
    metrics = measure(artifact, student, task, recipe.measure, reference)
    kernels = runtime.kernels(artifact, task.example_input.numpy(), recipe.measure.threads)
    recipe.save(out_dir / RECIPE)
    clock.append(time.perf_counter())
    stages = ("compress", "deploy", "measure")
    seconds = {stage: round(b - a, 3) for stage, a, b in zip(stages, clock[:-1], clock[1:], strict=True)}
    layer_kernels = runtime.layer_kernels(artifact)
    int8 = [n for n in layer_names(student) if recipe.quantize.activation_bits_of(n) == 8]
    return CompressedModel(student, artifact, metrics, kernels, layer_kernels,
                           runtime.fp32_fallbacks(layer_kernels, int8), seconds, trained.epochs)


def train_student(recipe: Recipe, task: Task, lesson: Lesson, generation: int = 0, progress: bool = True) -> Trained:
    """The recipe's student restructured, then pruned and fine-tuned on ``lesson`` round by round (the prune
    schedule); generation g > 0 (a distillation mode's later pass) draws its seeds ``GENERATION_SEEDS`` x g
    later."""
    seed = recipe.seed + GENERATION_SEEDS * generation
    student, facts = restructured(recipe, task, seed)
    early = task.early_teacher() if recipe.prune.init == "rewind" else None
    prunable = facts.prunable
    schedule = recipe.finetune.schedule(recipe.prune.rounds)  # one-shot when rounds == 1
    hint_pairs = distillation_pairs(recipe, task, prunable, set(layer_names(student)))
    trained: list[int] = []  # epochs each round's fine-tune ran
    for r, epochs in enumerate(schedule, start=1):
        # the teacher's layers: a group named by a layer of a dropped block still prunes its other members
        prune(student, task.example_input, recipe.prune, prunable, task.train, seed=seed,
              progress=r / len(schedule))
        if early is not None:  # lottery-ticket rewinding: the kept weights back to early training, masks kept
            try:
                rewind(student, early)
            except ValueError as err:
                raise ConfigError(f"'rewind' needs Task.early_teacher to return the teacher's own state dict: {err}.",
                                  "recipe.prune.init") from None
        qat = recipe.quantize.qat and r == len(schedule)  # QAT in the last fine-tune
        # a student from scratch learns in fp32 first: quantizers calibrated on its random weights and activations
        # clip what it learns (int8 inputs with QAT from the first epoch left digits CNN students at chance)
        fp32_first = epochs // 2 if qat and recipe.student.scratch else 0
        round_seed = seed + r - 1
        ran = fine_tune(student, task, recipe, hint_pairs, fp32_first, round_seed, qat=False, progress=progress,
                        lesson=lesson) if fp32_first else 0
        trained.append(ran + fine_tune(student, task, recipe, hint_pairs, epochs - fp32_first, round_seed, qat=qat,
                                       progress=progress, lesson=lesson))
    return Trained(student, trained)


def checked_mode(recipe: Recipe, task: Task) -> tuple[Mode, list[nn.Module]]:
    """The recipe's distillation mode and the extra teachers it may use (``Task.teachers``, then those
    ``distill.teachers`` names); a ConfigError naming ``recipe.distill.mode`` where the mode lacks what it needs."""
    mode = MODES.get(recipe.distill.mode, field="recipe.distill.mode")
    teachers = [*task.teachers, *(extra_teacher(ref, task, f"recipe.distill.teachers[{i}]")
                                  for i, ref in enumerate(recipe.distill.teachers))]
    unmet = mode.unmet(recipe, task, teachers)
    if unmet:
        raise ConfigError(f"{recipe.distill.mode!r} {unmet}.", "recipe.distill.mode")
    return mode, teachers


def extra_teacher(ref: str, task: Task, field_name: str) -> nn.Module:
    """The teacher of task ``ref`` (a built-in name or ``"package.module:function"``), which must hold ``task``'s
    data and classes: a teacher of other data would teach other targets."""
    try:
        other = loaded_task(ref)
    except ConfigError as err:  # the task it names is not the recipe's task: the error is this field's
        raise ConfigError(err.message, field_name) from None
    mine, theirs = task.data_digest(), other.data_digest()
    if mine != theirs:
        raise ConfigError(f"must name a task on the same data as {task.name!r}, but {ref!r} holds other data "
                          f"(data digest {theirs[:12]}, not {mine[:12]}).", field_name)
    return other.teacher


@functools.cache
def loaded_task(ref: str) -> Task:
    """``load_task(ref)``, once a process (an extra teacher is loaded and checked once, not once a trial)."""
    from autocomp.tasks.load import load_task

    return load_task(ref)


def restructured(recipe: Recipe, task: Task, seed: int | None = None) -> tuple[nn.Module, ModelFacts]:
    """The recipe's student (a new network initialised from ``seed``, default the recipe's), checked against its
    facts (a ConfigError names the field) and restructured (``restructure``), untrained and unpruned, with its
    facts: what ``apply`` compresses, and what ``autocomp apply --dry-run`` checks."""
    if recipe.prune.init == "rewind" and task.early_teacher is None:
        raise ConfigError(f"'rewind' needs the teacher's weights early in its training (Task.early_teacher), but task "
                          f"{task.name!r} gives none.", "recipe.prune.init")
    student, facts = student_and_facts(recipe, task, recipe.seed if seed is None else seed)
    facts.check(recipe)
    restructure(student, recipe, task)
    return student, facts


def restructure(student: nn.Module, recipe: Recipe, task: Task) -> None:
    """The recipe's edits before channels go: its least contributing residual blocks dropped, then its share of
    every attention module's heads."""
    if recipe.prune.drop_blocks:
        drop_blocks(student, recipe.prune.drop_blocks, task.train.x[:CALIBRATION_SAMPLES])
    if recipe.prune.heads:
        drop_heads(student, recipe.prune.heads, head_counts(student))


def distillation_pairs(recipe: Recipe, task: Task, prunable: dict[str, PrunableLayer],
                       present: set[str]) -> list[tuple[str, str]]:
    """(student layer, teacher layer) pairs that feature distillation matches: the teacher's graph pairs each kept
    layer with itself, a new network its layers with the teacher's by relative depth; a ConfigError where the
    recipe's distillation mode cannot use them (``Mode.check_hints``)."""
    hints = [n for n in prunable if n in present]
    pairs = [(n, n) for n in hints] if family(recipe.student.family).derived else by_depth(
        hints, list(teacher_facts(task).prunable))
    MODES.get(recipe.distill.mode, field="recipe.distill.mode").check_hints(pairs)
    return pairs


def fine_tune(student: nn.Module, task: Task, recipe: Recipe, pairs: list[tuple[str, str]], epochs: int,
              seed: int, qat: bool, progress: bool, lesson: Lesson | None = None) -> int:
    """Distil/fine-tune ``student`` in place for up to ``epochs`` on ``lesson`` (default: the task's teacher); return
    the epochs it trained (fewer when ``finetune.patience`` stopped it: ranked on validation accuracy, as trials
    are)."""
    q = recipe.quantize
    penalty = recipe.prune.bn_penalty
    bns = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    quantized = layer_names(student)
    fake_quantized = quantization_aware(
        student, {name: q.bits_of(name) for name in quantized}, task.train.x[:CALIBRATION_SAMPLES], q.calibration,
        per_channel=q.per_channel, symmetric=q.symmetric,
        quantize_inputs=[name for name in quantized if q.activation_bits_of(name) == 8],
    ) if qat else contextlib.nullcontext()
    stopping = EarlyStopping(lambda model: task.score(model, task.val), recipe.finetune.patience)
    lesson = lesson or from_task_teacher(recipe, task)
    with fake_quantized, lesson.loss(student, task, recipe.distill, pairs) as loss:
        fit(student, task.train, FiniteLoss(loss), epochs=epochs, lr=recipe.finetune.lr,
            batch_size=recipe.finetune.batch_size,
            regularizer=(lambda: penalty * sum(bn.weight.abs().sum() for bn in bns)) if penalty > 0 else None,
            on_epoch_end=(lambda g: regrow(student, recipe.prune.regrow, g)) if recipe.prune.regrow > 0 else None,
            early_stopping=stopping, seed=seed, desc="fine-tune", progress=progress)
    return stopping.epochs_run


@dataclass
class Baseline:
    """The teacher's own artifact, the reference every trial is timed against, and its metrics."""

    artifact: Path
    metrics: dict[str, float]


def teacher_baseline(task: Task, spec: Measure, out_dir: str | Path,
                     recorded: dict[str, float] | None = None) -> Baseline:
    """The teacher exported and measured by the same path, with nothing compressed, into ``out_dir``.

    ``latency_ms`` is the teacher's own median, unless ``recorded`` (the teacher metrics of the study a
    recipe came from) fixes the scale: then ratios measured now read in that study's milliseconds.
    """
    identity = Recipe(task=task.name, finetune=FineTune(epochs=0), measure=spec)
    metrics = apply(identity, task, out_dir, progress=False).metrics
    metrics["latency_ms"] = recorded["latency_ms"] if recorded else metrics["latency_raw_ms"]
    return Baseline(Path(out_dir) / ARTIFACT, metrics)
