"""apply(recipe, task): the one path from a Recipe to a measured, deployable artifact.

Search trials and ``autocomp apply`` both call :func:`apply`, so an exported recipe reproduces
its trial by construction.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from autocomp import runtime
from autocomp.compress.blocks import drop_blocks, residual_blocks
from autocomp.compress.distill import Distiller
from autocomp.compress.heads import attention_layers, drop_heads, head_counts
from autocomp.compress.prune import PrunableLayer, finalize_masks, prunable_layers, prune, regrow
from autocomp.compress.qat import quantization_aware
from autocomp.compress.quantize import deploy
from autocomp.features import layer_names
from autocomp.measure import measure
from autocomp.recipe import FineTune, Measure, Recipe
from autocomp.tasks.base import Task
from autocomp.train import fit

ARTIFACT, RECIPE = "model.onnx", "recipe.yaml"
CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class TeacherFacts:
    """What ``apply`` checks a recipe against: the teacher's prunable layers (``prunable_layers``), its
    Conv/Linear layers, residual blocks and attention modules; ``left_out`` says which groups cannot be pruned."""

    prunable: dict[str, PrunableLayer]
    layers: list[str]
    blocks: list[str]
    attention: list[str]
    left_out: list[str]


_FACTS: weakref.WeakKeyDictionary[nn.Module, TeacherFacts] = weakref.WeakKeyDictionary()


def teacher_facts(task: Task) -> TeacherFacts:
    """The facts of ``task``'s teacher, found once per teacher object while it lives (tracing the dependency
    graph and probing groups take up to a second; a search's trials share one teacher, never modified)."""
    facts = _FACTS.get(task.teacher)
    if facts is None:
        left_out: list[str] = []
        facts = _FACTS[task.teacher] = TeacherFacts(
            prunable_layers(task.teacher, task.example_input, left_out=left_out), layer_names(task.teacher),
            residual_blocks(task.teacher, task.example_input), attention_layers(task.teacher), left_out)
    return facts


@dataclass
class CompressedModel:
    model: nn.Module  # the pruned, fine-tuned fp32 torch model the artifact was made from
    artifact: Path  # the deployable ONNX file
    metrics: dict[str, float]  # measured on the artifact
    kernels: dict[str, int]  # the ONNX Runtime kernels one inference executes, with counts
    layer_kernels: dict[str, str]  # Conv/Linear layer -> the ONNX Runtime kernel that computes it
    fp32_layers: dict[str, str]  # layers the recipe puts on int8 kernels that stayed fp32 -> why
    seconds: dict[str, float]  # wall-clock time of each stage: compress (prune + fine-tune), deploy, measure


def apply(recipe: Recipe, task: Task, out_dir: str | Path, progress: bool = True,
          reference: Path | None = None) -> CompressedModel:
    """Drop blocks -> prune -> distil/fine-tune (per round) -> export -> quantize -> measure, into ``out_dir``.

    Latency is timed side by side with the ``reference`` artifact (the teacher's), or alone without one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = [time.perf_counter()]
    facts = teacher_facts(task)
    prunable = facts.prunable
    recipe.check_layers(prunable, facts.layers, facts.blocks, facts.attention)
    student = copy.deepcopy(task.teacher)
    if recipe.prune.drop_blocks:
        drop_blocks(student, recipe.prune.drop_blocks, task.train.x[:CALIBRATION_SAMPLES])
    if recipe.prune.heads:
        drop_heads(student, recipe.prune.heads, head_counts(task.teacher))
    present = set(layer_names(student))
    schedule = recipe.finetune.schedule(recipe.prune.rounds)  # one-shot when rounds == 1
    for r, epochs in enumerate(schedule, start=1):
        # the teacher's layers: a group named by a layer of a dropped block still prunes its other members
        prune(student, task.example_input, recipe.prune, prunable, task.train, seed=recipe.seed,
              progress=r / len(schedule))
        _fine_tune(student, task, recipe, [n for n in prunable if n in present], epochs, seed=recipe.seed + r - 1,
                   qat=recipe.quantize.qat and r == len(schedule), progress=progress)  # QAT in the last fine-tune
    finalize_masks(student)
    clock.append(time.perf_counter())
    artifact = deploy(student, task.example_input, recipe.quantize, task.train.x[:CALIBRATION_SAMPLES].numpy(),
                      out_dir / ARTIFACT, sparse=recipe.prune.granularity == "weight")
    clock.append(time.perf_counter())
    metrics = measure(artifact, student, task, recipe.measure, reference)
    kernels = runtime.kernels(artifact, task.example_input.numpy(), recipe.measure.threads)
    recipe.save(out_dir / RECIPE)
    clock.append(time.perf_counter())
    stages = ("compress", "deploy", "measure")
    seconds = {stage: round(b - a, 3) for stage, a, b in zip(stages, clock[:-1], clock[1:], strict=True)}
    layer_kernels = runtime.layer_kernels(artifact)
    int8 = [n for n in layer_names(student) if recipe.quantize.activation_bits_of(n) == 8]
    return CompressedModel(student, artifact, metrics, kernels, layer_kernels,
                           runtime.fp32_fallbacks(layer_kernels, int8), seconds)


def _fine_tune(student: nn.Module, task: Task, recipe: Recipe, layers: list[str], epochs: int, seed: int,
               qat: bool, progress: bool) -> None:
    d, q = recipe.distill, recipe.quantize
    penalty = recipe.prune.bn_penalty
    bns = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    quantized = layer_names(student)
    fake_quantized = quantization_aware(
        student, {name: q.bits_of(name) for name in quantized}, task.train.x[:CALIBRATION_SAMPLES], q.calibration,
        per_channel=q.per_channel, symmetric=q.symmetric,
        quantize_inputs=[name for name in quantized if q.activation_bits_of(name) == 8],
    ) if qat else contextlib.nullcontext()
    with fake_quantized, Distiller(task.teacher, student, task.example_input, kind=d.kind, temperature=d.temperature,
                                   alpha=d.alpha, weight=d.weight, layers=layers,
                                   teacher_logits=task.teacher_logits() if d.kind != "none" else None) as loss:
        fit(student, task.train, loss, epochs=epochs, lr=recipe.finetune.lr, batch_size=recipe.finetune.batch_size,
            regularizer=(lambda: penalty * sum(bn.weight.abs().sum() for bn in bns)) if penalty > 0 else None,
            on_epoch_end=(lambda g: regrow(student, recipe.prune.regrow, g)) if recipe.prune.regrow > 0 else None,
            seed=seed, desc="fine-tune", progress=progress)


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
