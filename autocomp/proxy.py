"""The cheap rung: score a recipe in a fraction of a full trial, without fine-tuning (ARCHITECTURE.md "Two rungs").

A candidate is compressed as ``apply`` compresses it (the same student, dropped blocks and heads, and pruning,
one-shot at the recipe's whole level), but not fine-tuned. Its BatchNorm statistics are then re-estimated on a
few hundred training samples (adaptive BN: Li et al., "EagleEye", ECCV 2020, show that the accuracy of a pruned
subnet after this recalibration ranks subnets much as their accuracy after fine-tuning does, where the plain
pruned accuracy does not; NVIDIA Model Optimizer's FastNAS recalibrates the same way). Its weights and int8
inputs are fake-quantized as the recipe deploys them, and its validation accuracy taken. A student trained from
scratch has no weights whose statistics could be re-estimated: it is distilled as its recipe says for
``SCRATCH_EPOCHS`` instead (the issue's "one-epoch fine-tune"; a tiny network trains an epoch in well under a
second), which ranks new networks by how fast they learn. Size is the bytes the
artifact would store for the pruned weights at their widths (``compress.pack.stored_bytes``), latency a
per-layer table's prediction where a table is given.

A proxy ranks candidates; it is never reported as a result: only full trials enter the front.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from autocomp.compress.pack import stored_bytes
from autocomp.compress.prune import prune
from autocomp.compress.qat import quantization_aware
from autocomp.compress.quantize import deploy
from autocomp.features import layer_names
from autocomp.measure import macs_and_params
from autocomp.methods import check_recipe
from autocomp.pipeline import CALIBRATION_SAMPLES, distillation_pairs, fine_tune, restructure, student_and_facts
from autocomp.recipe import Quantize, Recipe
from autocomp.tasks.base import Task
from autocomp.train import deterministic

BN_SAMPLES = 512  # training samples the BatchNorm statistics are re-estimated on
SCRATCH_EPOCHS = 4  # a student from scratch: epochs of the recipe's distillation before it is scored
# predicted latency (ms) of a pruned model whose named layers run on int8 kernels (``autocomp.latency_table``)
LatencyModel = Callable[[nn.Module, Tensor, Collection[str]], float]


@dataclass(frozen=True)
class ProxyScore:
    """What the cheap rung says of one recipe: validation accuracy without fine-tuning (``scratch``: after the
    short distillation of a student from scratch), the stored bytes, the predicted latency (None without a latency
    table), MACs and parameters, and the seconds it took."""

    val_accuracy: float
    size_bytes: int
    latency_ms: float | None
    macs: int
    params: int
    seconds: float
    scratch: bool = False

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


_GRAPH: weakref.WeakKeyDictionary[nn.Module, dict[tuple, float]] = weakref.WeakKeyDictionary()


def _kind(spec: Quantize, layer: str) -> str:
    """How a layer is stored: fp32, fp16, int8 kernels, or packed integer weights."""
    bits = spec.bits_of(layer)
    return "int8" if spec.activation_bits_of(layer) == 8 else "packed" if bits <= 8 else str(bits)


def graph_bytes(task: Task, spec: Quantize, layers: list[str]) -> int:
    """What the artifact's graph adds to its weights' bytes (``stored_bytes``): per Conv/Linear layer, by how it
    is stored, measured once per teacher on the teacher deployed each way (quantize/dequantize nodes, names)."""
    per_layer = _GRAPH.setdefault(task.teacher, {})
    total = 0.0
    for layer in layers:
        kind = _kind(spec, layer)
        key = (kind, spec.per_channel, spec.symmetric)
        if key not in per_layer:
            per_layer[key] = _graph_bytes_per_layer(task, kind, spec)
        total += per_layer[key]
    return round(total)


def _graph_bytes_per_layer(task: Task, kind: str, spec: Quantize) -> float:
    uniform = {"int8": {"bits": 8, "activation_bits": 8}, "packed": {"bits": 4}}[kind] if not kind.isdigit() else {
        "bits": int(kind)}
    teacher_spec = Quantize(**uniform, per_channel=spec.per_channel, symmetric=spec.symmetric)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = deploy(task.teacher, task.example_input, teacher_spec, task.train.x[:CALIBRATION_SAMPLES].numpy(),
                          Path(tmp) / "teacher.onnx")
        size = artifact.stat().st_size
    layers = layer_names(task.teacher)
    weights = stored_bytes(task.teacher, teacher_spec.bits_of, teacher_spec.per_channel, teacher_spec.symmetric)
    return max(size - weights, 0) / max(len(layers), 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor, batch_size: int = 64) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``x`` (adaptive BN): the statistics reset, then
    a cumulative average over forward passes in training mode, no parameter changed. Returns the number of
    BatchNorm layers; a model without any is left as it is."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative moving average: every batch weighs the same
    model.train()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()
    return len(norms)


def compressed(recipe: Recipe, task: Task) -> nn.Module:
    """The recipe's student with its structure compressed as ``apply`` compresses it (blocks, heads, channels or
    single weights at the whole level, one shot), not fine-tuned, its BatchNorm statistics re-estimated; a student
    from scratch, which has no weights to keep, distilled for ``SCRATCH_EPOCHS`` instead."""
    student, facts = student_and_facts(recipe, task)
    facts.check(recipe)
    restructure(student, recipe, task)
    prune(student, task.example_input, recipe.prune, facts.prunable, task.train, seed=recipe.seed)
    if recipe.student.scratch:
        pairs = distillation_pairs(recipe, task, facts.prunable, set(layer_names(student)))
        fine_tune(student, task, dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, patience=0)),
                  pairs, SCRATCH_EPOCHS, seed=recipe.seed, qat=False, progress=False)
    else:
        recalibrate_batchnorm(student, task.train.x[:BN_SAMPLES])
    return student.eval()


def score(recipe: Recipe, task: Task, latency: LatencyModel | None = None) -> ProxyScore:
    """Score ``recipe`` on the cheap rung (module docstring)."""
    started = time.perf_counter()
    recipe = check_recipe(recipe)
    with deterministic(threads=1):  # small batches: one thread is as fast, and far faster on a busy machine
        student = compressed(recipe, task)
        q = recipe.quantize
        layers = layer_names(student)
        int8 = [name for name in layers if q.activation_bits_of(name) == 8]
        with quantization_aware(student, {name: q.bits_of(name) for name in layers},
                                task.train.x[:CALIBRATION_SAMPLES], q.calibration, per_channel=q.per_channel,
                                symmetric=q.symmetric, quantize_inputs=int8):
            accuracy = task.score(student, task.val)
        counts = macs_and_params(student, task.example_input)
    size = stored_bytes(student, q.bits_of, q.per_channel, q.symmetric, sparse=recipe.prune.granularity == "weight")
    size += graph_bytes(task, q, layers)
    return ProxyScore(accuracy, size, None if latency is None else latency(student, task.example_input, int8),
                      counts["macs"], counts["params"], round(time.perf_counter() - started, 4),
                      recipe.student.scratch)
