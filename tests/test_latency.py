"""The latency protocol: side by side with a reference, adaptive, and repeatable."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from autocomp import latency, runtime
from autocomp.measure import time_artifact
from autocomp.recipe import Measure


def busy(ms: float):
    def run() -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    return run


def test_the_median_interval_is_the_binomial_order_statistics():
    assert latency.median_interval(np.arange(10.0)) == (1.0, 8.0)  # ranks 2 and 9 of 10: 97.9% coverage
    assert latency.median_interval(np.arange(7.0)) == (0.0, 6.0)  # 7 values: the whole range (98.4%)
    rng = np.random.default_rng(0)  # coverage of the true median 0 of a symmetric distribution
    hits = [lo <= 0 <= hi for lo, hi in (latency.median_interval(rng.standard_normal(25)) for _ in range(2000))]
    assert 0.95 <= np.mean(hits) <= 0.99


def test_a_twice_as_slow_candidate_reads_as_ratio_two():
    result = latency.compare(busy(0.4), busy(0.2), warmup_seconds=0.05, tolerance=0.02, max_seconds=3.0)
    assert abs(result.ratio - 2.0) < 0.1 and result.ratio_ci <= 0.05
    assert result.p10_ms <= result.median_ms <= result.p90_ms and 0.35 < result.median_ms < 0.6
    assert result.runs >= latency.MIN_ROUNDS * 3


def test_an_artifact_alone_has_ratio_one_and_its_spread():
    result = latency.compare(*(2 * [busy(0.1)]), warmup_seconds=0.05, tolerance=0.02, max_seconds=3.0)
    assert result.ratio == 1.0 and result.runs >= latency.MIN_ROUNDS * 3


class Wide(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_fresh_measurements_of_one_artifact_agree_within_ten_percent(tmp_path):
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 16, 16)  # about 0.07 ms, the scale of the shipped tasks' artifacts
    candidate = runtime.export_onnx(Wide(128).eval(), x, tmp_path / "c.onnx")  # two fresh sessions of one model
    reference = runtime.export_onnx(Wide(32).eval(), x, tmp_path / "r.onnx")  # can differ by 5-10%
    spec = Measure(warmup_seconds=0.5, max_seconds=5.0)
    ratios = sorted(time_artifact(candidate, reference, x.numpy(), spec).ratio for _ in range(3))
    assert ratios[0] > 1.2  # four times the width really is slower (about 2.5x here)
    # each interval is about +-2%, but fresh pairs of sessions differ beyond it (2-9% in runs here), and a
    # machine shared with other jobs can compress one measurement's ratio by 15% (2.52 then 2.16 once in CI):
    # of three fresh measurements, the two closest agree within 10%
    assert min(b / a - 1 for a, b in zip(ratios, ratios[1:], strict=False)) < 0.10
