"""Bring your own model: each shape of the zoo (``tests/zoo.py``) searched with the shipped ``joint.yaml`` (fine-tunes
of at most two epochs), as a user would, completes its trials, and every artifact reloads in ONNX Runtime and scores
what its trial recorded."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest

from autocomp import runtime
from autocomp.pipeline import ARTIFACT
from autocomp.search.optuna_runner import run_search
from autocomp.study import StudySpec
from tests import zoo
from tests.conftest import QUICK_MEASURE_YAML, ROOT, short_joint_space
from tests.test_cli import AUTOCOMP


def zoo_study(tmp_path: Path, name: str) -> StudySpec:
    """The shipped joint space on the zoo's task ``name``, with one-epoch fine-tunes."""
    path = tmp_path / "zoo.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: {name}\ntask: 'tests.zoo:{name}'\n"
                    f"space: {short_joint_space(tmp_path, 1)}\ntrials: 3\n"
                    + QUICK_MEASURE_YAML)
    return StudySpec.load(path)


def artifact_score(study: optuna.Study, trial: optuna.trial.FrozenTrial, spec: StudySpec, task) -> float:
    """The test score of the trial's stored artifact, run again in a fresh ONNX Runtime session."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    meta = next(m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == ARTIFACT)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT
        download_artifact(artifact_store=FileSystemArtifactStore(spec.artifacts), file_path=str(path),
                          artifact_id=meta.artifact_id)
        logits = runtime.run(runtime.session(path), task.test.x.numpy())
    return task.metric(logits, task.test.y.numpy())


@pytest.mark.parametrize("name", zoo.ZOO)
def test_a_search_of_the_shipped_joint_space_completes_on_every_shape(name, tmp_path):
    spec = zoo_study(tmp_path, name)
    study, trials = run_search(spec, progress=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # the first trials are the warm start's uniform policies (fp32 and static int8): every one completes
    assert len(complete) == len(trials) == 3, [t.user_attrs.get("error") for t in trials]
    task = getattr(zoo, name)()
    for trial in complete:
        assert artifact_score(study, trial, spec, task) == pytest.approx(trial.user_attrs["metrics"]["test_accuracy"])


def test_a_model_autocomp_cannot_compress_is_refused_in_one_line_before_the_study_exists(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"schema_version: 1\nstudy_name: s\ntask: 'tests.tasks:dict_output'\n"
                    f"space: {short_joint_space(tmp_path, 2)}\ntrials: 3\n")
    result = subprocess.run([AUTOCOMP, "search", str(path)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"autocomp: error: {path}: task 'tests.tasks:dict_output': the teacher (DictOutput) returns dict; autocomp "
        "compresses classifiers that return one (batch, classes) tensor of logits.")
    assert not (tmp_path / "s.db").exists()


def test_the_readme_example_task_loads_and_scores_with_its_own_metric():
    from autocomp.tasks.load import load_task
    from examples.byo_model import balanced_accuracy

    task = load_task("examples.byo_model:task")
    assert task.metric is balanced_accuracy and task.score(task.teacher, task.val) > 0.9
    assert balanced_accuracy(np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]]), np.array([0, 0, 0, 1])) == 1.0
    assert balanced_accuracy(np.array([[1.0, 0.0]] * 4), np.array([0, 0, 0, 1])) == 0.5  # accuracy would say 0.75
