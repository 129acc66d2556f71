"""End to end, as a user runs it: search -> pareto -> export -> apply, through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

import autocomp as autocomp_api
from autocomp.tasks.base import machine_cpu
from autocomp.tasks.load import load_task
from tests.conftest import QUICK_MEASURE_YAML, short_joint_space

AUTOCOMP = str(Path(sys.executable).parent / "autocomp")


def autocomp(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """``autocomp ARGS`` as a user runs it: the console script, in a process of its own."""
    result = subprocess.run([AUTOCOMP, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def front_trials(pareto_out: str) -> list[int]:
    """The trial numbers of ``autocomp pareto``'s table, in its order."""
    lines = pareto_out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["trial"])
    return [int(line.split()[0]) for line in lines[header + 1:] if line.split()[:1] and line.split()[0].isdigit()]


def autocomp_here(capsys: pytest.CaptureFixture, *args: str, expect: int = 0) -> tuple[str, str]:
    """``autocomp ARGS`` run by the console script's own entry point in this process (no interpreter to start):
    its stdout and stderr, the exit code checked."""
    from autocomp.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == expect, err[-3000:]
    return out, err


@pytest.fixture
def study_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "e2e.yaml"
    short_joint_space(tmp_path, 2)  # the shipped space with short fine-tunes
    path.write_text("schema_version: 1\nstudy_name: e2e\ntask: digits\nspace: space.yaml\n"
                    "trials: 3\npopulation_size: 4\n"
                    + QUICK_MEASURE_YAML)
    return path


@pytest.mark.slow
def test_search_pareto_export_apply_reproduces_the_trial(searched_e2e, tmp_path, capsys):
    study_yaml, out = searched_e2e
    assert "Pareto front on val_accuracy" in out and "teacher: val" in out and "3 complete, 0 fail" in out
    storage = f"sqlite:///{study_yaml.parent / 'e2e.db'}"
    study = optuna.load_study(storage=storage, study_name="e2e")
    states = [t.state.name for t in study.trials]  # the rest of the warm start waits for the next run
    assert states[:3] == ["COMPLETE"] * 3 and set(states[3:]) == {"WAITING"}
    assert study.metric_names == ["val_accuracy", "size_bytes", "latency_ms"]
    first = study.trials[0].user_attrs["recipe"]  # the warm start: uniform level 0.5, fp32, L1, logits KD
    assert {(e["sparsity"], e["criterion"]) for e in first["prune"]["layers"].values()} == {(0.5, "l1")}
    assert first["distill"]["kind"] == "logits" and first["quantize"]["activation_bits"] == 32
    assert study.trials[1].user_attrs["recipe"]["quantize"]["activation_bits"] == 8
    out, _ = autocomp_here(capsys, "sensitivity", str(study_yaml), "--png", str(tmp_path / "map.png"), "--no-progress")
    assert "group pruned alone" in out and (tmp_path / "map.png").stat().st_size > 5000
    assert set(study.user_attrs["sensitivity"]["prune"]) == {"conv1", "conv2", "conv3", "conv4", "fc1"}
    store = FileSystemArtifactStore(str(study_yaml.parent / "e2e_artifacts"))
    for trial in study.trials[:3]:  # each trial's artifact and recipe, as it measured and ran them
        stored = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(trial, storage=study._storage)}
        assert sorted(stored) == ["model.onnx", "recipe.yaml"]
        with store.open_reader(stored["model.onnx"]) as reader:
            assert len(reader.read()) == trial.user_attrs["metrics"]["size_bytes"]
        with store.open_reader(stored["recipe.yaml"]) as reader:
            assert yaml.safe_load(reader.read())["prune"] == trial.user_attrs["recipe"]["prune"]

    autocomp_here(capsys, "pareto", "--storage", storage, "--study-name", "e2e", "--csv", str(tmp_path / "front.csv"))
    front = pd.read_csv(tmp_path / "front.csv")
    assert set(front["trial"]) == {t.number for t in study.best_trials}
    assert list(front.columns[:8]) == ["trial", "val_%", "test_%", "test_drop_pp", "size_kb", "ratio_x",
                                       "latency_ms", "speedup_x"]

    out, _ = autocomp_here(capsys, "pareto", str(study_yaml), "--json", "--plot", str(tmp_path / "front.png"))
    found = json.loads(out)
    assert [row["trial"] for row in found["front"]] == list(front["trial"])  # the table's trials, in its order
    assert found["knee"] in set(front["trial"]) and found["hypervolume"]["val"] >= 0.0
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    out, _ = autocomp_here(capsys, "export", str(study_yaml), "--knee", "-o", str(tmp_path / "knee.yaml"))
    knee = study.trials[found["knee"]]
    assert out.startswith(f"trial {knee.number}: the knee") and "its artifact knee.onnx" in out
    model = autocomp_api.load(tmp_path / "knee.yaml")  # the exported artifact, beside its recipe
    assert model.path == tmp_path / "knee.onnx" and model.size_bytes == knee.user_attrs["metrics"]["size_bytes"]
    test = load_task("digits").test
    assert model(test.x[:3]).shape == (3, 10)  # a torch batch in, logits out
    assert load_task("digits").metric(model(test.x.numpy()), test.y.numpy()) == \
        knee.user_attrs["metrics"]["test_accuracy"]  # what the trial measured on its artifact

    number = int(front["trial"][0])
    autocomp_here(capsys, "export", str(study_yaml), "--trial", str(number), "-o", str(tmp_path / "recipe.yaml"))
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    readme_snippet_runs(tmp_path, study.trials[number].user_attrs["metrics"], capsys)
    assert recipe["provenance"]["trial"] == number and recipe["provenance"]["versions"]["torch"]
    assert len(recipe["provenance"]["fingerprint"]["teacher_sha256"]) == 64
    recorded = study.trials[number].user_attrs["metrics"]

    tampered = {**recipe, "provenance": {**recipe["provenance"],
                                         "metrics": {**recorded, "val_accuracy": recorded["val_accuracy"] - 0.01}}}
    (tmp_path / "tampered.yaml").write_text(yaml.safe_dump(tampered))
    result = autocomp("apply", str(tmp_path / "tampered.yaml"), "-o", str(tmp_path / "out"), "--verify", expect=1)
    assert f"autocomp: verify: val_accuracy: replay {recorded['val_accuracy']:.6g}, recorded " \
           f"{recorded['val_accuracy'] - 0.01:.6g}" in result.stderr
    assert "test_accuracy" not in result.stderr and "size_bytes" not in result.stderr
    replayed = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "size_bytes", "macs", "params", "nonzero_params"):
        assert replayed[key] == recorded[key], key  # training is deterministic: the replay is the trial
    assert replayed["size_bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    task = load_task("digits")
    replay = autocomp_api.load(tmp_path / "out")  # apply's folder, in a user's code
    assert task.metric(replay(task.test.x), task.test.y.numpy()) == replayed["test_accuracy"]
    # latencies are real timings: how close a replay's is to the trial's is measured in benchmarks, not asserted
    # here (this machine read them 29% apart once, idle; README "How latency is measured")

    assert recipe["provenance"]["fingerprint"]["cpu"] == machine_cpu()
    recipe["provenance"]["fingerprint"]["teacher_sha256"] = "0" * 64  # as if made for another teacher,
    recipe["provenance"]["fingerprint"]["cpu"] = "GenuineIntel family 6 model 85, avx512f"  # on another CPU
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(recipe))
    _, err = autocomp_here(capsys, "apply", str(tmp_path / "other.yaml"), "-o", str(tmp_path / "o2"), expect=2)
    assert "teacher_sha256 000000000000..." in err and "another teacher" in err
    assert "made on a GenuineIntel family 6 model 85, avx512f CPU" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()
    out, _ = autocomp_here(capsys, "apply", str(tmp_path / "other.yaml"), "-o", str(tmp_path / "o2"),
                           "--allow-other-teacher")
    assert "warning: the recipe was made for another teacher" in out


def readme_snippet_runs(folder: Path, recorded: dict, capsys: pytest.CaptureFixture) -> None:
    """The README's ``autocomp.load`` snippet, run as written beside an exported ``recipe.yaml``: the accuracy it
    prints is the trial's, measured on its artifact."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(block for block in readme.split("```python\n")[1:] if 'autocomp.load("recipe.yaml")' in block)
    here = Path.cwd()
    os.chdir(folder)
    try:
        exec(compile(snippet.split("```")[0], "README.md", "exec"), {})
    finally:
        os.chdir(here)
    out, _ = capsys.readouterr()
    assert f"test accuracy {recorded['test_accuracy']:.4f}" in out and "Deployed('recipe.onnx'" in out


def test_a_recipes_refusals_name_the_file_and_its_field_and_come_before_training(tmp_path, capsys):
    """A hand-written recipe's mistakes, each one line naming the file and the field, exit 2: an extra teacher that
    names no task (not blamed on the recipe's own ``task``), ``--verify`` of a recipe with nothing recorded (said
    before the run, nothing written), and self-distillation of a student with one hint layer (by the dry run as
    by the run)."""
    def recipe(name: str, distill: str) -> Path:
        path = tmp_path / name
        path.write_text("schema_version: 1\ntask: digits\nstudent: {family: cnn, config: {depth: [1], width: [8]}}\n"
                        f"distill: {distill}\nfinetune: {{epochs: 1}}\n" + QUICK_MEASURE_YAML)
        return path

    bad = recipe("teachers.yaml", "{mode: multi_teacher, teachers: [digts]}")
    _, err = autocomp_here(capsys, "apply", str(bad), "-o", str(tmp_path / "o"), "--dry-run", expect=2)
    assert err.startswith(f"autocomp: error: {bad}: `recipe.distill.teachers[0]` must name a registered task ")
    assert err.endswith("but got 'digts'. Did you mean 'digits'?\n") and err.count("\n") == 1
    plain = recipe("plain.yaml", "{mode: offline}")
    _, err = autocomp_here(capsys, "apply", str(plain), "-o", str(tmp_path / "o"), "--verify", expect=2)
    assert "--verify compares with the metrics an exported recipe records" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before the run: nothing written
    shallow = recipe("self.yaml", "{mode: self}")
    for dry in (["--dry-run"], []):  # the dry run says it too
        _, err = autocomp_here(capsys, "apply", str(shallow), "-o", str(tmp_path / "s"), *dry, expect=2)
        assert err.startswith(f"autocomp: error: {shallow}: `recipe.distill.mode` 'self' needs a student with at "
                              "least two hint layers") and err.count("\n") == 1


def test_help_is_plain_text(capsys):
    out, _ = autocomp_here(capsys, "--help")
    assert out.startswith("usage: autocomp") and "Search how to compress a trained PyTorch model" in out
    assert "``" not in out  # no reStructuredText markup from a docstring


def test_bad_input_is_one_line_and_exit_2(study_yaml, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(study_yaml.read_text().replace("task: digits", "task: digts"))
    _, err = autocomp_here(capsys, "search", str(bad), expect=2)
    assert err == (
        f"autocomp: error: {bad}: `task` must name a registered task ['digits', 'mnist1d', 'mnist1d_lean', "
        "'mnist1d_transformer'], but got 'digts'. Did you mean 'digits'?\n")
    assert not (tmp_path / "e2e.db").exists()  # nothing was created for a study that never started
    _, err = autocomp_here(capsys, "pareto", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--study-name", "x",
                           expect=2)
    assert "No study 'x'" in err and err.count("\n") == 1
    _, err = autocomp_here(capsys, "apply", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o"), expect=2)
    assert "cannot be read" in err and err.count("\n") == 1
    result = autocomp("search", str(bad), expect=2)  # the console script itself: the same one line
    assert result.stderr == f"autocomp: error: {bad}: `task` must name a registered task ['digits', 'mnist1d', " \
                            "'mnist1d_lean', 'mnist1d_transformer'], but got 'digts'. Did you mean 'digits'?\n"
