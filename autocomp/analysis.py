"""A front read as numbers: the hypervolume normalised to the teacher, the knee, the best point within an accuracy
budget. ``autocomp pareto``, ``compare``, ``export --knee``, the search's progress bar and
``benchmarks/search_quality.py`` share these definitions.

Each trial is its metrics (``autocomp.measure.with_ratios``: accuracies, ``compression_ratio``, ``speedup``,
drops in points). The normalised space, maximised, puts the teacher at (1, 0, 0):

- accuracy: (accuracy - teacher's + 5 pp) / 5 pp, so the teacher's accuracy is 1 and five points below it 0;
- log2 of the size ratio (teacher / artifact);
- log2 of the speedup (ONNX Runtime, against the teacher timed side by side).

The **hypervolume** is the volume that the front's points dominate above the reference point (0, 0, 0): a point
counts only where it is smaller and faster than the teacher and within 5 pp of it. One unit is, for example, a
model as accurate as the teacher, half its size and twice as fast. The front is chosen on validation (validation
accuracy, size, latency); its hypervolume is reported on validation and on test (the test split only reports).

The **knee** is the validation front's point nearest the ideal one: the teacher's validation accuracy, the front's
largest size ratio and its largest speedup, the size and speed axes scaled by the front's largest (log2) value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autocomp.fidelity import dominates

ACCURACY_SPAN = 0.05  # the hypervolume counts points within 5 pp of the teacher
WITHIN_PP = 1.0  # "best within budget": at most this drop in validation accuracy (points)
Metrics = dict[str, float]


def normalised(metrics: Metrics, teacher: Metrics, split: str = "test") -> list[float]:
    """A trial's point in the normalised space (maximised): accuracy on ``split``, log2 size ratio, log2 speedup."""
    accuracy = f"{split}_accuracy"
    return [(metrics[accuracy] - teacher[accuracy] + ACCURACY_SPAN) / ACCURACY_SPAN,
            math.log2(metrics["compression_ratio"]), math.log2(metrics["speedup"])]


def front(points: Sequence[Metrics]) -> list[int]:
    """The indices of the points no other beats on validation accuracy, size and latency (as a study ranks them):
    the first front only, one pass over the pairs."""
    losses = [[-m["val_accuracy"], m["size_bytes"], m["latency_ms"]] for m in points]
    return [i for i, loss in enumerate(losses) if not any(dominates(other, loss) for other in losses)]


def hypervolume(points: Sequence[Metrics], teacher: Metrics, split: str = "test") -> float:
    """The hypervolume of the validation front's points on ``split``, in the normalised space (module docstring)."""
    return _volume([points[i] for i in front(points)], teacher, split)


def _volume(chosen: Sequence[Metrics], teacher: Metrics, split: str) -> float:
    from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG; its public API has none for 3-D

    xyz = np.array([normalised(m, teacher, split) for m in chosen]).reshape(-1, 3)
    counted = xyz[(xyz > 0).all(axis=1)]
    return float(compute_hypervolume(-counted, np.zeros(3))) if len(counted) else 0.0


def knee(points: Sequence[Metrics], teacher: Metrics) -> int | None:
    """The index of the validation front's knee (module docstring); None without points."""
    return _knee(points, front(points), teacher)


def _knee(points: Sequence[Metrics], chosen: list[int], teacher: Metrics) -> int | None:
    if not chosen:
        return None
    xyz = np.array([normalised(points[i], teacher, "val") for i in chosen])
    xyz[:, 0] = np.minimum(xyz[:, 0], 1.0)  # more accurate than the teacher is as good as the teacher here
    top = np.maximum(xyz[:, 1:].max(axis=0), 1e-9)
    xyz[:, 1:] /= top
    return chosen[int(np.argmin(np.linalg.norm(xyz - 1.0, axis=1)))]


def best_within(points: Sequence[Metrics], metric: str, max_drop_pp: float = WITHIN_PP) -> int | None:
    """The index of the point with the largest ``metric`` among those within ``max_drop_pp`` of the teacher on
    validation; None where no point is."""
    near = [i for i, m in enumerate(points) if m["val_drop_pp"] <= max_drop_pp]
    return max(near, key=lambda i: points[i][metric]) if near else None


def summary(points: Sequence[Metrics], teacher: Metrics) -> dict:
    """What ``pareto --json`` and ``compare`` report of a study's complete trials (indices into ``points``)."""
    chosen = front(points)  # once: the volumes and the knee read the same front
    on_front = [points[i] for i in chosen]
    return {"complete": len(points), "front": chosen,
            "hypervolume": {"val": _volume(on_front, teacher, "val"), "test": _volume(on_front, teacher, "test")},
            "knee": _knee(points, chosen, teacher), "best_size_within_1pp": best_within(points, "compression_ratio"),
            "best_speedup_within_1pp": best_within(points, "speedup")}
