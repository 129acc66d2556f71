"""The per-layer latency table: geometry keys, lazy measurement and persistence, on a fake timer (its agreement with
real timings: `make bench-latency-table`)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autocomp import latency_table as lt
from autocomp.features import layer_names


class FakeTimer:
    """Milliseconds from what a file computes: 0.01 per call plus 1e-5 per weight element (a quarter of that in an
    int8 graph), so a prediction can be checked by hand, times ``slower`` (a machine that other work slows down);
    cold twice hot. ``timed`` counts the graphs timed beside the reference."""

    def __init__(self) -> None:
        self.timed, self.slower = 0, 1.0

    def __call__(self, files) -> list[float]:
        import onnx

        times = []
        for path, _x in files:
            graph = onnx.load(str(path)).graph
            weights = sum(int(np.prod(i.dims)) for i in graph.initializer if len(i.dims) > 1)
            int8 = any(node.op_type == "QuantizeLinear" for node in graph.node)
            hot = self.slower * (0.01 + 1e-5 * weights * (0.25 if int8 else 1.0))
            times.append((hot, 2 * hot))
        self.timed += len(files) - 1
        return times


def refuse(files) -> list[float]:
    raise AssertionError(f"timed {len(files)} files")


def conv1d_net(width: int) -> nn.Module:
    """(B, 1, 16) -> 10 classes: two Conv1d layers and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, width, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * width * 8, 10)).eval()


X = torch.zeros(1, 1, 16)


def by_hand(width: int, int8: bool) -> float:
    """What ``FakeTimer`` makes of ``conv1d_net(width)``: the first stem alone (1 weight) plus each layer's weights."""
    c1, c2, features = lt.bucket(width), lt.bucket(2 * width), lt.bucket(2 * width * 8)
    weights = 1 + c1 * 5 + c2 * c1 * 3 + features * 10
    return 0.01 + 1e-5 * weights * (0.25 if int8 else 1.0)


def test_channels_round_up_four_steps_per_octave_keeping_their_alignment():
    assert [lt.bucket(c) for c in (1, 3, 8, 9, 11, 17, 25, 38, 45, 64, 65, 72, 100, 144, 200, 256)] == \
        [1, 3, 8, 10, 12, 20, 28, 39, 47, 64, 79, 72, 111, 160, 216, 256]
    ladder = [lt.bucket(c) for c in range(1, 1025)]
    assert all(c <= b <= max(c, 1.25 * c) for c, b in enumerate(ladder, start=1))
    assert all((b % 8 == 0, b % 16 == 0) == (c % 8 == 0, c % 16 == 0)  # the layout ONNX Runtime picks is the layer's
               for c, b in enumerate(ladder, start=1))
    assert all(lt.bucket(b) == b for b in ladder)
    assert len(set(ladder)) <= 8 + 3 * 4 * 7  # exact up to 8, then up to twelve widths per doubling up to 1024


def test_keys_are_geometries_with_bucketed_channels():
    def key(layer: nn.Module, shape: tuple[int, ...], int8: bool = False) -> str:
        return lt.Geometry.of(layer, shape, int8).key

    assert key(nn.Conv2d(41, 45, 3, padding=1), (41, 8, 8)) == key(nn.Conv2d(47, 47, 3, padding=1), (47, 8, 8)) == \
        "Conv2d in=47x8x8 out=47 k=3x3 s=1x1 p=1x1 d=1x1 g=1 bias fp32"
    assert key(nn.Conv2d(40, 48, 3, padding=1), (40, 8, 8)).startswith("Conv2d in=40x8x8 out=48")
    assert key(nn.Conv2d(48, 48, 3), (48, 8, 8)) != key(nn.Conv2d(48, 48, 3, padding=1), (48, 8, 8))
    assert key(nn.Conv1d(45, 45, 3, groups=45, bias=False), (45, 20)) == \
        "Conv1d in=47x20 out=47 k=3 s=1 p=0 d=1 g=47 fp32"  # depthwise stays depthwise
    assert key(nn.Conv1d(33, 33, 3, groups=3), (33, 20)).startswith("Conv1d in=39x20 out=39")  # multiples of groups
    assert key(nn.Linear(125, 10), (125,)) == "Linear in=127 out=10 bias fp32"
    assert key(nn.Linear(125, 10), (125,), int8=True) == "Linear in=127 out=10 bias int8"


def test_the_sum_is_the_fixed_cost_plus_what_each_layer_adds_behind_its_stem():
    a = lt.Geometry.of(nn.Conv1d(1, 8, 5), (1, 16), int8=False)
    b = lt.Geometry.of(nn.Linear(96, 10), (96,), int8=False)
    entries = {lt.graph_key((a.stem(),)): (0.010, 0.02), lt.graph_key((a.stem(), a)): (0.014, 0.03),
               lt.graph_key((b.stem(),)): (0.011, 0.02), lt.graph_key((b.stem(), b)): (0.010, 0.02)}  # b adds 0
    assert lt.predicted_ms(entries, [a, b], cold=False) == pytest.approx(0.010 + 0.004)
    assert lt.predicted_ms(entries, [a, a], cold=False) == pytest.approx(0.010 + 2 * 0.004)
    assert lt.predicted_ms(entries, [a, b], cold=True) == pytest.approx(0.02 + 0.01)
    assert [len(g) for g in lt.graphs([a, b, a])] == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear layer"):
        lt.predicted_ms(entries, [], cold=False)


def test_a_model_whose_weights_outgrow_the_cache_reads_the_cold_entries(tmp_path: Path):
    int8 = lt.Geometry.of(nn.Conv1d(16, 32, 3, groups=2), (16, 20), int8=True)
    assert int8.weights() == 32 * 8 * 3 and lt.weight_bytes([int8, replace(int8, int8=False)]) == 5 * 32 * 8 * 3
    assert lt.Geometry.of(nn.Linear(96, 10), (96,), int8=False).weights() == 960
    model = conv1d_net(8)  # 8 * 5 + 16 * 8 * 3 + 128 * 10 weights, 4 bytes each: 6,816 bytes
    table = lt.LatencyTable(tmp_path / "table.json", timer=FakeTimer(), cache_bytes=6816)
    assert table.predict(model, X, []) == pytest.approx(by_hand(8, int8=False))
    assert table.predict(model, X, layer_names(model)) == pytest.approx(by_hand(8, int8=True))  # a quarter
    table.cache_bytes = 6815
    assert table.predict(model, X, []) == pytest.approx(2 * by_hand(8, int8=False))


def test_predict_times_each_geometry_once(tmp_path: Path):
    timer = FakeTimer()
    table = lt.LatencyTable(tmp_path / "table.json", timer=timer)
    model = conv1d_net(10)
    assert table.predict(model, X, []) == pytest.approx(by_hand(10, int8=False))
    assert timer.timed == 6  # three layers behind their stems, three stems alone
    assert table.predict(model, X, []) == pytest.approx(by_hand(10, int8=False))
    assert table.predict(conv1d_net(9), X, []) == pytest.approx(by_hand(10, int8=False))  # the same buckets
    assert timer.timed == 6
    assert model.training is False and len(model._forward_pre_hooks) == 0


class Mask(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (weight.abs() > 0.1)


def test_a_weight_masked_layer_is_predicted_as_the_dense_layer_it_runs_as(tmp_path: Path):
    """Weight pruning masks through a parametrization, whose class is ``ParametrizedConv1d``."""
    table = lt.LatencyTable(tmp_path / "table.json", timer=FakeTimer())
    model = conv1d_net(10)
    for layer in (model[0], model[2], model[5]):
        nn.utils.parametrize.register_parametrization(layer, "weight", Mask())
    assert type(model[0]).__name__ == "ParametrizedConv1d"
    assert table.predict(model, X, []) == pytest.approx(by_hand(10, int8=False))


def test_int8_layers_are_entries_of_their_own(tmp_path: Path):
    timer = FakeTimer()
    table = lt.LatencyTable(tmp_path / "table.json", timer=timer)
    model = conv1d_net(16)
    fp32 = table.predict(model, X, [])
    int8 = table.predict(model, X, layer_names(model))
    assert timer.timed == 12 and int8 < fp32
    assert int8 == pytest.approx(by_hand(16, int8=True))
    assert sum(key.endswith("int8") for key in table.entries) == 6
    mixed = table.predict(model, X, ["0"])  # the first layer int8, the others fp32: every graph is known
    assert timer.timed == 12 and int8 < mixed < fp32


def test_the_table_round_trips_through_its_file(tmp_path: Path):
    path = tmp_path / "latency" / "table.json"
    first = lt.LatencyTable(path, timer=FakeTimer())
    predicted = first.predict(conv1d_net(8), X, ["2"])
    data = json.loads(path.read_text())
    assert data["schema_version"] == lt.SCHEMA_VERSION and data["machine"] == lt.machine(1)
    assert {k: tuple(v) for k, v in data["entries"].items()} == first.entries and len(data["entries"]) == 6
    assert data["reference_ms"] == pytest.approx(0.01 + 1e-5 * 16 * 32 * 9)
    assert not list(path.parent.glob("*.tmp*"))  # written to a temporary file, then moved over the table
    second = lt.LatencyTable(path, timer=refuse)
    assert second.predict(conv1d_net(8), X, ["2"]) == predicted


def test_the_default_table_is_cached_per_machine_and_thread_count():
    from autocomp.tasks.base import cache_dir

    assert lt.table_path(1).parent == cache_dir() / "latency" and lt.table_path(1) != lt.table_path(2)
    assert {"cpu", "kernels", "onnxruntime", "threads"} <= set(lt.machine(1))


def test_tables_saved_side_by_side_keep_each_others_entries(tmp_path: Path):
    path = tmp_path / "table.json"
    one, other = lt.LatencyTable(path, timer=FakeTimer()), lt.LatencyTable(path, timer=FakeTimer())
    one.predict(conv1d_net(8), X, [])
    other.predict(conv1d_net(32), X, [])  # loaded before one saved: merges with one's entries when it saves
    third = lt.LatencyTable(path, timer=refuse)
    assert third.predict(conv1d_net(8), X, []) == pytest.approx(by_hand(8, int8=False))
    assert third.predict(conv1d_net(32), X, []) == pytest.approx(by_hand(32, int8=False))


def test_entries_timed_under_other_load_share_one_scale(tmp_path: Path):
    timer = FakeTimer()
    table = lt.LatencyTable(tmp_path / "table.json", timer=timer)
    table.predict(conv1d_net(8), X, [])
    timer.slower = 3.0  # the next batch, reference included, runs three times slower: read on the table's scale
    assert table.predict(conv1d_net(32), X, []) == pytest.approx(by_hand(32, int8=False))
    timer.slower = 0.5
    other = lt.LatencyTable(tmp_path / "other.json", timer=timer)  # begun on another scale, merged into the file's
    assert other.predict(conv1d_net(64), X, []) == pytest.approx(0.5 * by_hand(64, int8=False))
    other.path = table.path
    other.save()
    assert other.predict(conv1d_net(64), X, []) == pytest.approx(by_hand(64, int8=False))
    assert lt.LatencyTable(tmp_path / "table.json", timer=refuse).predict(conv1d_net(64), X, []) == \
        pytest.approx(by_hand(64, int8=False))


@pytest.mark.parametrize("content", [
    '{"schema_version": 1, "machine": {}, "entr', "[]", "",
    '{"schema_version": 1, "machine": MACHINE, "reference_ms": 0.1, "entries": {"a": -1.0}}',
    '{"schema_version": 1, "machine": MACHINE, "reference_ms": 0.1, "entries": {"a": [0.1]}}',
    '{"schema_version": 1, "machine": {"cpu": "another"}, "reference_ms": 0.1, "entries": {}}'])
def test_a_half_written_or_foreign_file_is_not_trusted(tmp_path: Path, content: str):
    path = tmp_path / "table.json"
    path.write_text(content.replace("MACHINE", json.dumps(lt.machine(1))))
    with pytest.warns(UserWarning, match="not used"):
        table = lt.LatencyTable(path, timer=FakeTimer())
    assert table.entries == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table.predict(conv1d_net(8), X, [])
        assert lt.LatencyTable(path, timer=refuse).entries == table.entries  # rebuilt, and whole
