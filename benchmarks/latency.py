"""The latency protocol (``autocomp.latency``) on real artifacts and a real machine: what the test suite leaves to
this benchmark, because machine noise would fail a test of it.

- **Repeatability**: one artifact pair (a small conv net at width 64, static int8 against fp32) timed side by side
  ``--repeats`` times in this process, then once in each of ``--repeats`` fresh processes: the ratios and their
  spread (largest / smallest - 1).
- **Load accounting**: the same pair timed while a spinning process, then a hashing thread of this process, keeps
  one core busy: the ``load`` each timing records (about 1.0 is right: one core busy beside the measurement), and
  its ratio against the ratios timed alone.

Run it on an idle machine (nothing else running): its own load reading says whether it was.

    .venv/bin/python benchmarks/latency.py [--repeats 3] [--out benchmarks/results/latency.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autocomp.compress.quantize import deploy
from autocomp.measure import time_artifact
from autocomp.recipe import Measure, Quantize

ROOT = Path(__file__).resolve().parents[1]
SPEC = Measure()  # the shipped protocol: 1 s warm-up, 5-10 s of interleaved blocks


def conv_net(width: int = 64) -> nn.Module:
    """(B, 3, 16, 16) -> 10 classes: three 3x3 convolutions (two strided) and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * width * 16, 10)).eval()


def artifacts(folder: Path) -> tuple[Path, Path]:
    """The int8 candidate and its fp32 reference."""
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = conv_net()
    int8 = deploy(model, x[:1], Quantize(bits=8, activation_bits=8, per_channel=True), x.numpy(),
                  folder / "int8.onnx")
    return int8, deploy(model, x[:1], Quantize(), x.numpy(), folder / "fp32.onnx")


def timed(candidate: Path, reference: Path) -> dict:
    result = time_artifact(candidate, reference, np.zeros((1, 3, 16, 16), np.float32), SPEC)
    return {"ratio": result.ratio, "ci": result.ratio_ci, "load": result.load, "noisy": result.noisy}


def spinning_process() -> Callable[[], None]:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    return lambda: (neighbour.kill(), neighbour.wait())


def hashing_thread() -> Callable[[], None]:  # a thread of this very process, on the other core (hashlib frees the GIL)
    stop, data = threading.Event(), bytes(1 << 25)
    worker = threading.Thread(target=lambda: [hashlib.sha256(data) for _ in iter(stop.is_set, True)])
    worker.start()
    return lambda: (stop.set(), worker.join())


def spread(ratios: list[float]) -> float:
    return max(ratios) / min(ratios) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latency.md")
    parser.add_argument("--one", nargs=2, type=Path, help=argparse.SUPPRESS)  # a fresh process's single timing
    args = parser.parse_args()
    if args.one:
        print(json.dumps(timed(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        candidate, reference = artifacts(Path(tmp))
        in_process = [timed(candidate, reference) for _ in range(args.repeats)]
        fresh = [json.loads(subprocess.run([sys.executable, __file__, "--one", str(candidate), str(reference)],
                                           check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                 for _ in range(args.repeats)]
        loaded = {}
        for name, start in [("a spinning process", spinning_process), ("a hashing thread", hashing_thread)]:
            stop = start()
            time.sleep(0.5)  # started
            try:
                loaded[name] = timed(candidate, reference)
            finally:
                stop()
    alone = [r["ratio"] for r in in_process + fresh]
    lines = [f"`benchmarks/latency.py --repeats {args.repeats}` on this machine ({os.cpu_count()} cores), "
             f"{time.strftime('%Y-%m-%d')}: int8 against fp32 of one small conv net, the shipped protocol "
             f"(`Measure()`: {SPEC.warmup_seconds:g} s warm-up, {SPEC.min_seconds:g}-{SPEC.max_seconds:g} s).", "",
             "| timing | ratio | 95% interval | load (cores busy elsewhere) | noisy |", "|---|---:|---:|---:|---|"]
    rows = ([(f"in this process, {i + 1}", r) for i, r in enumerate(in_process)]
            + [(f"fresh process, {i + 1}", r) for i, r in enumerate(fresh)]
            + [(f"beside {name}", r) for name, r in loaded.items()])
    lines += [f"| {name} | {r['ratio']:.3f} | ±{100 * r['ci']:.1f}% | {r['load']:.2f} | {r['noisy']} |"
              for name, r in rows]
    lines += ["", f"- spread of the ratios alone: {100 * spread(alone):.1f}% in this process and fresh ones "
                  f"({100 * spread([r['ratio'] for r in in_process]):.1f}% in this process)",
              *[f"- beside {name}: load {r['load']:.2f}, ratio {100 * (r['ratio'] / np.median(alone) - 1):+.1f}% "
                f"against the median alone" for name, r in loaded.items()]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"in_process": in_process, "fresh_process": fresh,
                                                         "loaded": loaded}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
