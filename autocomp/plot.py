"""The plot of ``autocomp pareto --plot`` and ``compare --plot``: validation accuracy against size and against
latency, every complete trial shown, each study's front highlighted, the teacher marked. PNG, SVG, or HTML (the
SVG inline, one self-contained file)."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path

from autocomp.errors import AutocompError

FORMATS = (".png", ".svg", ".html")
AXES = (("size_bytes", 1e-3, "size (KB, ONNX file)"), ("latency_ms", 1.0, "latency (ms, ONNX Runtime)"))


@dataclass(frozen=True)
class Series:
    """One study on the plot: its complete trials' metrics and numbers, the indices of its front, its teacher's
    metrics."""

    name: str
    points: list[dict[str, float]]
    numbers: list[int]
    front: list[int]
    teacher: dict[str, float]


def check_path(path: Path) -> None:
    if path.suffix.lower() not in FORMATS:
        raise AutocompError(f"--plot must end in one of {list(FORMATS)}, but got {str(path)!r}.")


def front_plot(series: list[Series], path: Path, title: str) -> Path:
    """Write the plot of ``series`` to ``path`` (its suffix says the format); return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    check_path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, scale, label) in zip(axes, AXES, strict=True):
        for n, s in enumerate(series):
            colour = colours[n % len(colours)]
            name = f"{s.name}: " if len(series) > 1 else ""
            ax.scatter([m[key] * scale for m in s.points], [100 * m["val_accuracy"] for m in s.points], s=12,
                       color=colour, alpha=0.25, label=f"{name}every complete trial")
            best = [s.points[i] for i in s.front]  # the front in every objective: no line, it is not a 2-D front
            ax.scatter([m[key] * scale for m in best], [100 * m["val_accuracy"] for m in best], s=36,
                       color=colour, edgecolors="black", linewidths=0.6, label=f"{name}Pareto front")
            for i in s.front:  # the trial numbers `autocomp pareto` lists
                ax.annotate(str(s.numbers[i]), (s.points[i][key] * scale, 100 * s.points[i]["val_accuracy"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7, color=colour)
        teacher = series[0].teacher
        ax.scatter([teacher[key] * scale], [100 * teacher["val_accuracy"]], marker="*", s=160, color="black",
                   label="teacher", zorder=5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".html":
        svg = io.StringIO()
        fig.savefig(svg, format="svg")
        path.write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"</head><body>\n{svg.getvalue()[svg.getvalue().index('<svg'):]}\n</body></html>\n")
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
