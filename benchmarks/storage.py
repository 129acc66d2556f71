"""How each weight storage of the deployed artifact compares with fp32: file size, latency, accuracy.

The teacher of a built-in task is deployed by ``autocomp.compress.quantize.deploy`` (the path every
trial takes) once per storage; each is timed side by side with the fp32 artifact by the protocol every
trial uses (``autocomp.latency``: interleaved blocks until the ratio's 95% interval is within 2%): on a
noisy machine compare the ratios, not the absolute times.

    .venv/bin/python benchmarks/storage.py [--task digits] [--out benchmarks/results/storage.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from autocomp import runtime
from autocomp.compress.quantize import deploy
from autocomp.measure import time_artifact
from autocomp.recipe import Measure, Quantize
from autocomp.tasks.load import load_task

STORAGES = {
    "fp32": Quantize(),
    "fp16 weights": Quantize(bits=16),
    "int8 weights (fp32 kernels)": Quantize(bits=8, per_channel=True),
    "int4 weights (Linear: MatMulNBits)": Quantize(bits=4, per_channel=True),
    "int4 k-means weights": Quantize(bits=4, kmeans=True),
    "int2 weights": Quantize(bits=2, per_channel=True),
    "static int8 (int8 kernels)": Quantize(bits=8, activation_bits=8, per_channel=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "storage.md")
    args = parser.parse_args()
    task = load_task(args.task)
    x, y = task.test.x.numpy(), task.test.y.numpy()
    spec = Measure(batch_size=1, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: deploy(task.teacher, task.example_input, quantize, task.train.x[:256].numpy(),
                              Path(tmp) / f"{i}.onnx") for i, (name, quantize) in enumerate(STORAGES.items())}
        rows = []
        for name, path in paths.items():
            timing = time_artifact(path, paths["fp32"], task.example_input.numpy(), spec)
            rows.append((name, path.stat().st_size / 1024, paths["fp32"].stat().st_size / path.stat().st_size,
                         timing.median_ms, timing.ratio, 100 * timing.ratio_ci,
                         100 * task.metric(runtime.run(runtime.session(path), x), y),
                         ", ".join(sorted(set(runtime.layer_kernels(path).values())))))
    lines = [f"Task `{args.task}` teacher, batch 1, 1 thread; latency / fp32 timed side by side (autocomp.latency), "
             "with the half-width of its 95% interval.", "",
             "| storage | size KB | smaller x | latency ms | latency / fp32 | +- % | accuracy % | layer kernels |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.2f} | {r[7]} |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
