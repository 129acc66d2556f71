"""How each weight storage of the deployed artifact compares with fp32: file size, latency, accuracy.

The teacher of a built-in task is deployed by ``autocomp.compress.quantize.deploy`` (the path every
trial takes) once per storage; latencies are measured in interleaved rounds (each round times every
artifact once) and reported as the median over rounds, next to the fp32 artifact measured in the same
rounds: on a noisy machine compare the ratios, not the absolute times.

    .venv/bin/python benchmarks/storage.py [--task digits] [--rounds 7] [--out benchmarks/results/storage.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from autocomp import runtime
from autocomp.compress.quantize import deploy
from autocomp.measure import latency_ms
from autocomp.recipe import Measure, Quantize
from autocomp.tasks import load_task

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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "storage.md")
    args = parser.parse_args()
    task = load_task(args.task)
    x, y = task.test.x.numpy(), task.test.y.numpy()
    spec = Measure(batch_size=1, threads=1, warmup=50, repeats=300)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: deploy(task.teacher, task.example_input, quantize, task.train.x[:256].numpy(),
                              Path(tmp) / f"{i}.onnx") for i, (name, quantize) in enumerate(STORAGES.items())}
        sessions = {name: runtime.session(path) for name, path in paths.items()}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                times[name].append(latency_ms(sess, task.example_input.numpy(), spec)["latency_ms"])
        rows = []
        for name, path in paths.items():
            size, latency = path.stat().st_size, float(np.median(times[name]))
            rows.append((name, size / 1024, paths["fp32"].stat().st_size / size, latency,
                         latency / np.median(times["fp32"]), 100 * task.metric(runtime.run(sessions[name], x), y),
                         ", ".join(sorted(set(runtime.layer_kernels(path).values())))))
    lines = [f"Task `{args.task}` teacher, batch 1, 1 thread, median of {args.rounds} interleaved rounds of "
             f"{spec.repeats} runs.", "",
             "| storage | size KB | smaller x | latency ms | latency / fp32 | accuracy % | layer kernels |",
             "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
