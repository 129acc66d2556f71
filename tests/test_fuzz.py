"""Fuzzing the user's inputs: valid study, space and recipe YAML files and CLI argument lists, mutated (keys
dropped, wrong types, out-of-range and huge numbers, unicode, empty lists, unknown keys). Every case ends in exit 2
with one line naming the file and field (a YAML error) or in success, never in a traceback, and a stored study's
trials stay as they were. Bounded: the cases of all tests here run in well under a minute."""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autocomp.cli import main
from autocomp.errors import ConfigError
from autocomp.recipe import Recipe
from autocomp.storage import open_storage
from tests.conftest import ROOT

CASES = 150  # per test; each case is one command run in this process
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ODD_VALUES = [None, True, -1, 0, 10**30, -(10**30), 1e309, float("nan"), 0.5, "", "x", "ñ✓😀", "a" * 5000,
              [], {}, [1, "two", None], {"ü": [None]}, "../../etc/passwd", "sqlite:///nowhere/x.db"]


def run(*argv: str) -> tuple[int, str, str]:
    """``autocomp ARGV`` in this process: its exit code, stdout and stderr. Any error but a user error (one line,
    exit 2) propagates and fails the test with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as stop:  # argparse
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, err: str, file: Path | None = None) -> None:
    """Success, or exit 2 with one error line (beside notes) that names ``file``."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("autocomp: note:")]
    if code == 0:
        return
    assert code == 2 and len(errors) == 1 and errors[0].startswith("autocomp"), (code, err)
    if file is not None and "error: The " not in errors[0]:  # a field's error names its file (unreadable: itself)
        assert str(file) in errors[0], errors[0]


@st.composite
def mutated(draw: st.DrawFn, data: dict) -> dict:
    """``data`` with one to three mutations, each at a path drawn through its mappings and lists."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        node: Any = data
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            how = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
            if how == "drop":
                del node[key]
            elif how == "replace":
                node[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
            elif isinstance(node, dict):
                node[draw(st.sampled_from(["extra", "ñame", "trials ", "Prune"]))] = copy.deepcopy(
                    draw(st.sampled_from(ODD_VALUES)))
            else:
                node.append(copy.deepcopy(draw(st.sampled_from(ODD_VALUES))))
            break
    return data


STUDY = {"schema_version": 1, "study_name": "fuzz", "task": "tests.tasks:plateau", "space": "space.yaml",
         "trials": 3, "timeout": 600, "trial_timeout": 60, "seed": 0, "sampler": "nsga2", "population_size": 4,
         "objectives": {"val_accuracy": "maximize", "size_bytes": "minimize", "latency_ms": "minimize"},
         "storage": "sqlite:///fuzz.db", "measure": {"batch_size": 1, "threads": 1, "warmup_seconds": 0.0},
         "constraints": {"params": 100000}, "screening": {"epochs": 0.5, "promote": 0.5, "grace": 2}}
RECIPE = {**Recipe(task="tests.tasks:plateau").to_dict(),
          "prune": {"layers": {"0": {"sparsity": 0.5, "criterion": "l2"}}, "criterion": "l1"},
          "quantize": {"activation_bits": 8, "bits": 8, "calibration": "percentile"},
          "distill": {"kind": "logits", "alpha": 0.5, "temperature": 4.0}, "finetune": {"epochs": 1}}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "search_spaces" / "joint.yaml", tmp_path / "space.yaml")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    return tmp_path


def test_the_valid_files_pass_their_dry_runs(folder):
    code, out, err = run("search", str(folder / "study.yaml"), "--dry-run")
    assert code == 0 and "dry run: nothing stored" in out, err
    assert not (folder / "fuzz.db").exists()
    code, out, err = run("apply", str(folder / "recipe.yaml"), "-o", str(folder / "out"), "--dry-run")
    assert code == 0 and "1 pruned layer(s); dry run: nothing written" in out, err
    assert not (folder / "out").exists()


@FUZZ
@given(data=mutated(STUDY))
def test_mutated_study_files_end_in_one_line_or_success(folder, data):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code, _, err = run("search", str(path), "--dry-run")
    check_outcome(code, err, path)


@FUZZ
@given(data=mutated(yaml.safe_load((ROOT / "search_spaces" / "joint.yaml").read_text())))
def test_mutated_space_files_end_in_one_line_or_success(folder, data):
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(data, allow_unicode=True))
    code, _, err = run("search", str(folder / "study.yaml"), "--dry-run")
    check_outcome(code, err, space)


@FUZZ
@given(data=mutated(RECIPE))
def test_mutated_recipe_files_end_in_one_line_or_success(folder, data):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code, _, err = run("apply", str(path), "-o", str(folder / "out"), "--dry-run")
    check_outcome(code, err, path)


TOKENS = ["--trials", "--trial", "--knee", "--max-drop", "--max-size", "--minimize", "--json", "--plot", "-o",
          "--storage", "--study-name", "--workers", "--backend", "--address", "--dry-run", "--debug", "-1", "0",
          "1e309", "nan", "", "ñ✓😀", "x.pdf", "sqlite:///", "postgresql://nobody@127.0.0.1:1/x", "ray", "99999"]


def stored(study_yaml: Path) -> list[tuple]:
    storage = f"sqlite:///{study_yaml.parent / 'e2e.db'}"
    trials = optuna.load_study(storage=open_storage(storage), study_name="e2e").trials
    return [(t.number, t.state.name, t.values, t.params, t.user_attrs) for t in trials]


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_command_lines_end_in_one_line_or_success_and_keep_the_stored_trials(searched_copy, data):
    study, before = searched_copy
    out = study.parent / "out"
    base = data.draw(st.sampled_from([
        ["pareto", str(study)], ["pareto", str(study), "--json"], ["compare", str(study), str(study)],
        ["export", str(study), "--trial", "0", "-o", str(out)], ["export", str(study), "--knee", "-o", str(out)],
        ["search", str(study), "--dry-run", "--trials", "5"], ["methods"]]))
    argv = list(base)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(argv)))
        how = data.draw(st.sampled_from(["drop", "replace", "insert"]))
        if how == "insert" or not argv[at:]:
            argv.insert(at, data.draw(st.sampled_from(TOKENS)))
        elif how == "drop":
            del argv[at]
        else:
            argv[at] = data.draw(st.sampled_from(TOKENS))
    if "search" in argv and "--dry-run" not in argv:
        argv.append("--dry-run")  # a search that starts would add trials: the stored ones are the point here
    if "--debug" in argv:
        argv.remove("--debug")
    code, _, err = run(*argv)
    check_outcome(code, err)
    assert stored(study) == before


@pytest.fixture(scope="module")
def searched_copy(searched_e2e, tmp_path_factory) -> tuple[Path, list[tuple]]:
    """A copy of the end-to-end test's searched study (its YAML, space, SQLite file and artifacts), and its trials."""
    folder = tmp_path_factory.mktemp("fuzz-study")
    shutil.copytree(searched_e2e[0].parent, folder, dirs_exist_ok=True)
    study = folder / searched_e2e[0].name
    return study, stored(study)


def test_debug_shows_the_traceback(folder):
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "trials": -1}))
    code, _, err = run("search", str(path), "--dry-run")
    assert code == 2 and err == f"autocomp: error: {path}: `study.trials` must be in [1, 1000000], but got -1.\n"
    with pytest.raises(ConfigError, match="study.trials"):
        main(["--debug", "search", str(path), "--dry-run"])
