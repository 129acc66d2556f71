"""The calibrators and fake quantization against their definitions."""

from __future__ import annotations

import pytest
import torch

from autocomp.compress.calibrate import CALIBRATORS, fake_quantize, qrange, scale_zero_point


def heavy_tailed(n: int = 100_000) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    x[:5] = 40.0 * torch.sign(torch.randn(5, generator=g))  # 0.005% huge outliers
    return list(x.chunk(10))


def test_symmetric_4bit_per_channel_error_is_at_most_half_a_step():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 7).view(6, 1, 1, 1)
    hi = w.flatten(1).abs().amax(1)
    q = fake_quantize(w, -hi, hi, bits=4, symmetric=True, axis=0)
    step = hi / 7  # 4-bit symmetric: levels -8..7, scale = max|w| / 7
    error = (q - w).abs().flatten(1).amax(1)
    assert torch.all(error <= step / 2 + 1e-6)
    assert len(torch.unique(q[0])) <= 16


def test_asymmetric_grid_holds_zero_and_the_range():
    scale, zp = scale_zero_point(torch.tensor(-1.0), torch.tensor(3.0), bits=8, symmetric=False)
    assert qrange(8, False) == (0, 255) and torch.isclose(scale, torch.tensor(4.0 / 255))
    x = torch.tensor([-1.0, 0.0, 3.0])
    q = fake_quantize(x, -1.0, 3.0, bits=8, symmetric=False)
    assert q[1] == 0.0 and torch.allclose(q, x, atol=float(scale) / 2)


def test_fake_quantization_passes_gradients_straight_through():
    x = torch.tensor([0.3, -0.7, 5.0], requires_grad=True)
    fake_quantize(x, -1.0, 1.0, bits=4, symmetric=True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # clipped values get no gradient


def test_entropy_picks_a_tighter_range_than_minmax_on_a_heavy_tailed_tensor():
    batches = heavy_tailed()
    lo, hi = CALIBRATORS.get("minmax")().range(batches, 8, True)
    e_lo, e_hi = CALIBRATORS.get("entropy")().range(batches, 8, True)
    assert (lo, hi) == (-40.0, 40.0)
    assert 2.0 < e_hi < 0.5 * hi and e_lo == -e_hi


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_clipping_calibrators_lower_the_error_of_the_bulk(name):
    batches = heavy_tailed()
    x = torch.cat(batches)
    bulk = x.abs() < 4

    def bulk_error(lo: float, hi: float) -> float:
        return float((fake_quantize(x, lo, hi, 4, True) - x)[bulk].pow(2).mean())

    assert bulk_error(*CALIBRATORS.get(name)().range(batches, 4, True)) < 0.2 * bulk_error(-40.0, 40.0)


def test_mse_minimises_the_total_error():
    batches = heavy_tailed()
    x = torch.cat(batches)
    lo, hi = CALIBRATORS.get("mse")().range(batches, 4, True)
    best = float((fake_quantize(x, lo, hi, 4, True) - x).pow(2).mean())
    for alpha in (0.05, 0.2, 0.5, 1.0):
        assert best <= float((fake_quantize(x, -40 * alpha, 40 * alpha, 4, True) - x).pow(2).mean()) + 1e-9


def test_moving_average_follows_the_batches_slowly():
    batches = [torch.tensor([-1.0, 1.0])] + [torch.tensor([-3.0, 3.0])] * 10
    lo, hi = CALIBRATORS.get("moving_average")().range(batches, 8, False)
    assert -1.0 - 2.0 * (1 - 0.99**10) == pytest.approx(lo) and hi == pytest.approx(-lo)


def test_percentile_clips_the_outliers_only():
    lo, hi = CALIBRATORS.get("percentile")().range(heavy_tailed(), 8, True)
    assert 3.0 < hi < 5.0 and lo == -hi
