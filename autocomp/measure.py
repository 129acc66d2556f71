"""Honest metrics, always taken on the deployable artifact (ARCHITECTURE.md, 'Honest numbers').

Accuracy is measured on both held-out splits: a search ranks trials on ``val_accuracy`` and only
reports ``test_accuracy`` (selecting on the test split would report the winner's curse).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from autocomp import latency, runtime
from autocomp.recipe import Measure
from autocomp.tasks.base import Task

SPLITS = ("val", "test")
# held while an artifact is timed: workers of a search on one machine (or several searches) train side by side
# but time one at a time, so a timing never shares the machine with another timing
LATENCY_LOCK = Path(tempfile.gettempdir()) / "autocomp-latency.lock"


def time_artifact(artifact: Path, reference: Path | None, example_input: np.ndarray, spec: Measure) -> latency.Latency:
    """Time ``artifact`` side by side with ``reference`` (or alone) at the study's batch size and threads."""
    x = np.repeat(example_input, spec.batch_size, axis=0)

    def runners(path: Path) -> list[latency.Runner]:  # the sessions of one artifact
        sessions = [runtime.session(path, threads=spec.threads) for _ in range(spec.sessions)]
        feed = {sessions[0].get_inputs()[0].name: x}
        return [functools.partial(sess.run, None, feed) for sess in sessions]

    candidate = runners(artifact)
    with FileLock(LATENCY_LOCK):  # one timing at a time per machine, whatever else trains alongside
        return latency.compare(candidate, candidate if reference is None else runners(reference),
                               warmup_seconds=spec.warmup_seconds, tolerance=spec.tolerance,
                               max_seconds=spec.max_seconds, min_seconds=spec.min_seconds, min_rounds=spec.rounds)


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of one forward pass at batch 1, the parameter count, and the non-zero
    parameters (unstructured sparsity: masked weights are still stored and computed densely)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), example_input)
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    if macs < 0 or params < 0:
        raise RuntimeError(f"counted {macs} MACs and {params} parameters: module metadata disagrees with weights")
    return {"macs": int(macs), "params": int(params), "nonzero_params": nonzero}


def measure(artifact: Path, model: nn.Module, task: Task, spec: Measure,
            reference: Path | None = None) -> dict[str, float]:
    """Accuracy on the validation and test splits, size and latency (against ``reference``) of the
    artifact; MACs and parameters of the model it was made from."""
    sess = runtime.session(artifact, threads=spec.threads)
    scores = {f"{name}_accuracy": task.metric(runtime.run(sess, split.x.numpy()), split.y.numpy())
              for name, split in zip(SPLITS, (task.val, task.test), strict=True)}
    timing = time_artifact(artifact, reference, task.example_input.numpy(), spec)
    return {**scores, "size_bytes": artifact.stat().st_size, **timing.as_metrics(),
            **macs_and_params(model, task.example_input)}


def with_ratios(metrics: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """Add the comparisons against the teacher, measured the same way.

    ``latency_ms`` is the measured ratio to the teacher's artifact (timed side by side) times the
    teacher's latency when the study began: one scale for every trial of a study and its replays.
    """
    return {
        **metrics,
        **{f"{split}_drop_pp": 100.0 * (teacher[f"{split}_accuracy"] - metrics[f"{split}_accuracy"])
           for split in SPLITS},
        "compression_ratio": teacher["size_bytes"] / metrics["size_bytes"],
        "latency_ms": metrics["latency_ratio"] * teacher["latency_ms"],
        "speedup": 1.0 / metrics["latency_ratio"],
        "macs_ratio": teacher["macs"] / max(metrics["macs"], 1),
    }


VERIFIED = ("val_accuracy", "test_accuracy", "size_bytes")  # a replay reproduces these exactly
LATENCY_TOLERANCE = 0.10  # a replay's latency ratio to the teacher within 10% of the recorded one


def replay_differences(replayed: dict[str, float], recorded: dict[str, float],
                       latency_tolerance: float = LATENCY_TOLERANCE) -> list[str]:
    """How a replay's metrics differ from the ones its recipe recorded, one line each; empty where it reproduces
    them: the accuracies and the size exactly, the latency ratio to the teacher within ``latency_tolerance``."""
    lines = [f"{key}: replay {replayed[key]:.6g}, recorded {recorded[key]:.6g}" for key in VERIFIED
             if key in recorded and abs(replayed[key] - recorded[key]) > 1e-9 * max(1.0, abs(recorded[key]))]
    if "latency_ratio" in recorded:
        off = replayed["latency_ratio"] / recorded["latency_ratio"] - 1.0
        if abs(off) > latency_tolerance:
            lines.append(f"latency_ratio: replay {replayed['latency_ratio']:.4g}, recorded "
                         f"{recorded['latency_ratio']:.4g} ({100 * off:+.1f}%, more than {100 * latency_tolerance:g}%)")
    return lines
