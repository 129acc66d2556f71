from __future__ import annotations

import pytest

from autocomp.errors import ConfigError
from autocomp.study import StudySpec
from tests.conftest import ROOT


def test_demo_study_resolves_paths_next_to_its_file():
    spec = StudySpec.load(ROOT / "studies" / "digits.yaml")
    assert spec.storage == f"sqlite:///{ROOT / 'studies' / 'digits.db'}"
    assert spec.space == str(ROOT / "search_spaces" / "compact.yaml")
    assert spec.artifacts == str(ROOT / "studies" / "digits_artifacts")
    assert list(spec.objectives.items()) == [("val_accuracy", "maximize"), ("size_bytes", "minimize"),
                                             ("latency_ms", "minimize")]
    assert (spec.sampler, spec.timeout, spec.screening) == ("proxy", 300.0, None)  # the benchmark's winner


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ("objectives: {val_accuracy: maximise}", "study.objectives.val_accuracy", "Did you mean 'maximize'?"),
        ("objectives: {test_accuracy: maximize}", "study.objectives", "validation split"),
        ("objectives: {accuracy: maximize}", "study.objectives", "got 'accuracy'"),
        ("objectives: {latency: minimize}", "study.objectives", "Did you mean 'latency_ms'?"),
        ("sampler: nsga3", "study.sampler", "Did you mean 'nsga2'?"),
        ("trials: 0", "study.trials", "got 0"),
        ("measure: {threads: 0}", "study.measure.threads", "got 0"),
        ("constraints: {param: 1000}", "study.constraints", "Did you mean 'params'?"),
        ("constraints: {params: 0}", "study.constraints.params", "got 0"),
    ],
)
def test_bad_study_values(tmp_path, line, field, fragment):
    path = tmp_path / "s.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: s\ntask: digits\nspace: x.yaml\n{line}\n")
    with pytest.raises(ConfigError) as err:
        StudySpec.load(path)
    assert err.value.field == field and fragment in str(err.value)


def test_a_study_without_schema_version_is_read_as_this_version_with_a_note(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("study_name: s\ntask: digits\nspace: x.yaml\n")
    assert StudySpec.load(path).study_name == "s"
    assert capsys.readouterr().err == ("autocomp: note: the study has no `schema_version`; read as version 1 "
                                       "(write `schema_version: 1` to say so).\n")
    path.write_text("schema_version: 2\nstudy_name: s\ntask: digits\nspace: x.yaml\n")
    with pytest.raises(ConfigError, match="`study.schema_version` must be 1 .* but got 2"):
        StudySpec.load(path)


def test_a_missing_required_field_is_named_without_internal_names(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("schema_version: 1\ntask: digits\nspace: x.yaml\n")
    with pytest.raises(ConfigError) as err:
        StudySpec.load(path)
    assert str(err.value) == f"{path}: `study.study_name` is required, but missing."
