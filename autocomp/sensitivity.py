"""Sensitivity: how much validation accuracy the teacher loses when one part alone is compressed.

For every pruning group, its channels are pruned (L1) at several levels with the rest of the model
untouched; for every Conv/Linear layer, its weights are fake-quantized (per channel, min-max) at each bit
width, at 8 bits with 8-bit inputs too (what static int8 runs). No fine-tuning: the map ranks parts by
fragility, it does not predict the accuracy of a fine-tuned model. The same idea as the sensitivity
analysis that NVIDIA Model Optimizer's FastNAS runs before its subnet search; here the map shapes the
policies a search starts from (``autocomp.search.warm_start``) and is stored with the study. A teacher's map
is analysed once: ``cached`` keeps it next to the trained teachers, keyed by the teacher's weights, the data,
the metric and the levels and bits measured, so every later study of the same teacher reads it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autocomp import cache
from autocomp.compress.prune import prunable_layers, prune
from autocomp.compress.qat import quantization_aware
from autocomp.features import layer_names
from autocomp.pipeline import CALIBRATION_SAMPLES
from autocomp.recipe import LayerPrune, Prune
from autocomp.tasks.base import Task, cache_dir

LEVELS = (0.25, 0.5, 0.75)
BITS = (8, 4, 2)


@dataclass
class Sensitivity:
    """Validation accuracy of the teacher (``baseline``) and with one part compressed: ``prune[group][level]``,
    ``quantize[layer][bits]`` (keys are strings, as stored in a study's JSON attributes)."""

    baseline: float
    prune: dict[str, dict[str, float]]
    quantize: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        return cls(**data)

    def prune_drop(self, group: str, level: float) -> float:
        """Accuracy lost (points of 1.0) pruning ``group`` alone to ``level``, interpolated between measured levels."""
        measured = sorted(self.prune[group], key=float)
        accuracies = [self.prune[group][v] for v in measured]
        return self.baseline - float(np.interp(level, [float(v) for v in measured], accuracies))

    def quantize_drop(self, layer: str, bits: int) -> float:
        return self.baseline - self.quantize[layer][str(bits)]

    def table(self) -> str:
        """Both maps as text: accuracy drop in percentage points, the most fragile part first."""
        lines = [f"teacher validation accuracy {100 * self.baseline:.2f}%; drop in points, most fragile first",
                 "(weight bits 8: int8 weights and inputs, as static int8 runs)"]
        for title, rows in (("group pruned alone: share removed", self.prune),
                            ("layer quantized alone: weight bits", self.quantize)):
            columns = sorted(next(iter(rows.values())), key=float) if rows else []
            lines += ["", f"{title:<40}" + "".join(f"{c:>8}" for c in columns)]
            order = sorted(rows, key=lambda n: -sum(self.baseline - rows[n][c] for c in columns))
            lines += [f"{name:<40}" + "".join(f"{100 * (self.baseline - rows[name][c]):>8.2f}" for c in columns)
                      for name in order]
        return "\n".join(lines)

    def heat_map(self, path: str | Path) -> Path:
        """A PNG with one heat map per family: part x level, colour = accuracy drop in points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        maps = [(title, rows) for title, rows in (("pruning: share of channels removed", self.prune),
                                                  ("quantization: weight bits", self.quantize)) if rows]
        fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 1.5 + 0.35 * max(len(r) for _, r in maps)),
                                 squeeze=False)
        for ax, (title, rows) in zip(axes[0], maps, strict=True):
            columns = sorted(next(iter(rows.values())), key=float)
            drops = np.array([[100 * (self.baseline - rows[n][c]) for c in columns] for n in rows])
            image = ax.imshow(drops, cmap="Reds", vmin=0, aspect="auto")
            ax.set(title=title, xticks=range(len(columns)), xticklabels=columns, yticks=range(len(rows)),
                   yticklabels=list(rows))
            for (i, j), value in np.ndenumerate(drops):
                dark = value > 0.6 * drops.max()
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
            fig.colorbar(image, ax=ax, label="validation accuracy drop (points)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def analyse(task: Task, levels: tuple[float, ...] = LEVELS, bits: tuple[int, ...] = BITS,
            progress: bool = True) -> Sensitivity:
    """Prune each group alone at ``levels`` and quantize each layer alone at ``bits``; validation accuracy of each."""
    teacher = task.teacher.eval()

    def score(model: torch.nn.Module) -> float:
        return task.score(model, task.val)  # the task's own metric

    prunable = prunable_layers(teacher, task.example_input)
    groups = list(dict.fromkeys(layer.group for layer in prunable.values()))
    layers = layer_names(teacher)
    bar = tqdm(total=len(groups) * len(levels) + len(layers) * len(bits), desc="sensitivity", disable=not progress)
    pruned: dict[str, dict[str, float]] = {}
    for group in groups:
        pruned[group] = {}
        for level in levels:
            student = copy.deepcopy(teacher)
            prune(student, task.example_input, Prune(layers={group: LayerPrune(level, "l1")}), prunable, task.train)
            pruned[group][str(level)] = score(student)
            bar.update()
    quantized: dict[str, dict[str, float]] = {}
    calibration = task.train.x[:CALIBRATION_SAMPLES]
    for layer in layers:
        quantized[layer] = {}
        for b in bits:
            with quantization_aware(copy.deepcopy(teacher), {layer: b}, calibration, "minmax", per_channel=True,
                                    quantize_inputs=b == 8) as model:
                quantized[layer][str(b)] = score(model)
            bar.update()
    bar.close()
    return Sensitivity(score(teacher), pruned, quantized)


def cached(task: Task, progress: bool = True, recompute: bool = False) -> Sensitivity:
    """The map of ``task``'s teacher from the cache (``autocomp.tasks.base.cache_dir``), analysed and cached
    first where the cache has none for this teacher, data, metric, levels and bits (or ``recompute``)."""
    metric = getattr(task.metric, "__module__", "") + "." + getattr(task.metric, "__qualname__", repr(task.metric))
    key = hashlib.sha256(json.dumps([task.fingerprint(), metric, LEVELS, BITS, CALIBRATION_SAMPLES]).encode())
    path = cache_dir() / "sensitivity" / f"{task.name.replace(':', '_')}-{key.hexdigest()[:12]}.json"
    found = None if recompute else cache.read(path, lambda payload: Sensitivity.from_dict(json.loads(payload)),
                                               "sensitivity map")
    if found is not None:
        return found
    result = analyse(task, progress=progress)
    cache.write(path, json.dumps(result.to_dict()).encode())  # atomic, with its digest (autocomp.cache)
    return result
