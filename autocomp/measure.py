"""Honest metrics, always taken on the deployable artifact (ARCHITECTURE.md, 'Honest numbers')."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp import runtime
from autocomp.recipe import Measure
from autocomp.tasks.base import Task


def latency_ms(sess, example_input: np.ndarray, spec: Measure) -> dict[str, float]:
    """Median wall time of one ``sess.run`` at the study's batch size, after warm-up, with spread."""
    x = np.repeat(example_input, spec.batch_size, axis=0)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(spec.warmup):
        sess.run(None, feed)
    times = []
    for _ in range(spec.repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    q10, q50, q90 = np.percentile(times, [10, 50, 90])
    return {"latency_ms": float(q50), "latency_p10_ms": float(q10), "latency_p90_ms": float(q90)}


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of one forward pass at batch 1, and the parameter count."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), example_input)
    return {"macs": int(macs), "params": int(params)}


def measure(artifact: Path, model: nn.Module, task: Task, spec: Measure) -> dict[str, float]:
    """Accuracy, size, latency of the artifact; MACs and parameters of the model it was made from."""
    sess = runtime.session(artifact, threads=spec.threads)
    logits = runtime.run(sess, task.test.x.numpy())
    return {
        "accuracy": task.metric(logits, task.test.y.numpy()),
        "size_bytes": artifact.stat().st_size,
        **latency_ms(sess, task.example_input.numpy(), spec),
        **macs_and_params(model, task.example_input),
    }


def with_ratios(metrics: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """Add the comparisons against the teacher, measured the same way."""
    return {
        **metrics,
        "accuracy_drop_pp": 100.0 * (teacher["accuracy"] - metrics["accuracy"]),
        "compression_ratio": teacher["size_bytes"] / metrics["size_bytes"],
        "speedup": teacher["latency_ms"] / metrics["latency_ms"],
        "macs_ratio": teacher["macs"] / max(metrics["macs"], 1),
    }
