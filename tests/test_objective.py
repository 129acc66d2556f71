"""A trial's objective: what the cheap rung it offers the proxy sampler measures."""

from __future__ import annotations

import pytest

from autocomp.latency_table import LatencyTable
from autocomp.recipe import Measure
from autocomp.search.objective import Objective
from autocomp.space import SearchSpace
from autocomp.study import StudySpec

SPACE = {"schema_version": 1, "quantize": {"bits": [32, 8]}}


@pytest.mark.parametrize(("objectives", "batch_size", "table"), [
    ({"val_accuracy": "maximize", "latency_ms": "minimize"}, 1, True),
    ({"val_accuracy": "maximize", "latency_ms": "minimize"}, 8, False),  # the table holds batch-1 timings
    ({"val_accuracy": "maximize", "size_bytes": "minimize"}, 1, False),  # latency not asked: MACs suffice
])
def test_the_cheap_rung_predicts_latency_from_the_table_where_the_study_minimises_it(tmp_path, objectives,
                                                                                     batch_size, table):
    spec = StudySpec(study_name="s", task="digits", space="space.yaml", objectives=objectives,
                     measure=Measure(batch_size=batch_size), artifacts=str(tmp_path / "artifacts"))
    objective = Objective(spec, SearchSpace.from_dict(SPACE), None, None, {}, [], 0, None)
    model = objective.latency_model()
    if table:
        assert isinstance(model.__self__, LatencyTable) and objective.latency_model() is model  # one table
    else:
        assert model is None
