"""Reading a study: hypervolume and knee (``autocomp.analysis``), export by rule (``autocomp.pick``), ``pareto
--json/--plot`` and ``compare``, on studies whose trials' metrics are written by hand."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from autocomp import analysis
from autocomp.errors import AutocompError
from autocomp.measure import replay_differences, with_ratios
from autocomp.pick import Rule, pick, size_bytes
from autocomp.recipe import Recipe
from autocomp.storage import open_storage
from tests.test_cli import autocomp_here

TEACHER = {"val_accuracy": 0.95, "test_accuracy": 0.94, "size_bytes": 100_000, "latency_ms": 1.0, "macs": 10**6}


def metrics(val: float, test: float, size: float, latency: float) -> dict[str, float]:
    """A trial's metrics as ``with_ratios`` completes them, from accuracies, bytes and milliseconds."""
    measured = {"val_accuracy": val, "test_accuracy": test, "size_bytes": size, "latency_ratio": latency,
                "macs": 10**5, "params": 1000, "nonzero_params": 1000, "latency_noisy": False}
    return with_ratios(measured, TEACHER)


def test_hypervolume_of_two_points_equals_the_hand_computed_union_of_their_boxes():
    # test accuracy 1 pp below the teacher -> 0.8; 4x smaller -> 2; 2x faster -> 1: a box of 0.8 * 2 * 1 = 1.6
    a = metrics(0.95, 0.93, 25_000, 0.5)
    # 3 pp below -> 0.4; 16x smaller -> 4; sqrt(2)x faster -> 0.5: a box of 0.4 * 4 * 0.5 = 0.8
    b = metrics(0.92, 0.91, 6_250, 2 ** -0.5)
    assert analysis.normalised(a, TEACHER) == pytest.approx([0.8, 2.0, 1.0])
    assert analysis.normalised(b, TEACHER) == pytest.approx([0.4, 4.0, 0.5])
    # the boxes overlap in 0.4 * 2 * 0.5 = 0.4: 1.6 + 0.8 - 0.4
    assert analysis.hypervolume([a, b], TEACHER) == pytest.approx(2.0)
    slower = metrics(0.94, 0.94, 20_000, 1.2)  # slower than the teacher: counts nothing, whatever its size
    dominated = metrics(0.94, 0.935, 30_000, 0.6)  # a is better on validation in every objective
    assert analysis.front([a, b, slower, dominated]) == [0, 1, 2]
    assert analysis.hypervolume([a, b, slower, dominated], TEACHER) == pytest.approx(2.0)
    # on validation: a at 1.0 (0.95), b at 0.4 (0.92): 1.0 * 2 * 1 + 0.4 * 4 * 0.5 - 0.4 * 2 * 0.5
    assert analysis.hypervolume([a, b], TEACHER, "val") == pytest.approx(2.0 + 0.8 - 0.4)
    assert analysis.hypervolume([], TEACHER) == 0.0


def test_the_knee_is_the_front_point_nearest_the_ideal_one():
    points = [metrics(0.95, 0.94, 90_000, 0.95),  # the teacher's accuracy, hardly smaller
              metrics(0.945, 0.93, 20_000, 0.4),  # half a point lost, 5x smaller, 2.5x faster: the knee
              metrics(0.80, 0.80, 5_000, 0.3)]  # the smallest and fastest, 15 pp lost
    assert analysis.knee(points, TEACHER) == 1
    assert analysis.knee([], TEACHER) is None
    assert analysis.best_within(points, "compression_ratio") == 1  # within 1 pp on validation
    assert analysis.best_within(points, "compression_ratio", max_drop_pp=0.1) == 0


TRIALS = {3: metrics(0.95, 0.94, 60_000, 0.8), 5: metrics(0.945, 0.935, 30_000, 0.5),
          8: metrics(0.93, 0.93, 12_000, 0.3), 9: metrics(0.90, 0.89, 8_000, 0.25)}


def test_pick_rules_choose_on_validation_and_say_why():
    number, why = pick(TRIALS, Rule({"val_drop_pp": 1.0}, ("latency_ms", "minimize")), "s")
    assert number == 5 and "latency_ms smallest among val_drop_pp <= 1" in why and "(2 of 4 complete" in why
    number, _ = pick(TRIALS, Rule({"size_bytes": size_bytes("50KB")}), "s")  # default: the most accurate
    assert number == 5
    number, _ = pick(TRIALS, Rule({"val_drop_pp": 3.0}, ("compression_ratio", "maximize")), "s")
    assert number == 8
    assert size_bytes("1.5 MB") == 1.5e6 and size_bytes("20000") == 20000 and size_bytes("2KiB") == 2048
    with pytest.raises(ValueError, match="must be a size such as 50KB"):
        size_bytes("fifty")


def test_a_rule_no_trial_meets_is_one_line_naming_the_closest_trials():
    with pytest.raises(AutocompError) as caught:
        pick(TRIALS, Rule({"val_drop_pp": 1.0, "size_bytes": 10_000}), "s")
    message = str(caught.value)
    assert message.startswith("No complete trial of study 's' has val_drop_pp <= 1 and size_bytes <= 10000; "
                              "closest: trial 8 (val_drop_pp 2, size_bytes 12000); trial 5 (val_drop_pp 0.5, "
                              "size_bytes 30000); trial 9 (val_drop_pp 5, size_bytes 8000).")
    assert "\n" not in message
    with pytest.raises(AutocompError, match="the test split is only reported"):
        Rule(best=("test_accuracy", "maximize"))


def test_verify_names_what_a_replay_does_not_reproduce():
    recorded = TRIALS[5]
    assert replay_differences(dict(recorded), recorded) == []
    assert replay_differences({**recorded, "latency_ratio": 0.54}, recorded) == []  # 8% off: within 10%
    off = replay_differences({**recorded, "val_accuracy": 0.94, "latency_ratio": 0.6}, recorded)
    assert off == ["val_accuracy: replay 0.94, recorded 0.945",
                   "latency_ratio: replay 0.6, recorded 0.5 (+20.0%, more than 10%)"]


def _study(storage: str, name: str, trials: dict[int, dict[str, float]]) -> optuna.Study:
    """A study as ``autocomp search`` stores one: the teacher, and complete trials with metrics and recipes."""
    study = optuna.create_study(storage=open_storage(storage), study_name=name,
                                directions=["maximize", "minimize", "minimize"])
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        study.set_metric_names(["val_accuracy", "size_bytes", "latency_ms"])
    study.set_user_attr("teacher", TEACHER)
    for m in trials.values():
        study.add_trial(optuna.trial.create_trial(
            values=[m["val_accuracy"], m["size_bytes"], m["latency_ms"]],
            user_attrs={"metrics": m, "recipe": Recipe(task="digits").to_dict()}))
    return study


def test_pareto_json_and_plot_and_compare_side_by_side(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, "nsga2", TRIALS)
    _study(storage, "random", {0: TRIALS[3], 1: TRIALS[9]})
    out, _ = autocomp_here(capsys, "pareto", "--storage", storage, "--study-name", "nsga2", "--json",
                           "--plot", str(tmp_path / "front.html"))
    found = json.loads(out)
    assert [row["trial"] for row in found["front"]] == [0, 1, 2, 3]  # trial numbers of the study
    assert found["hypervolume"]["test"] == pytest.approx(analysis.hypervolume(list(TRIALS.values()), TEACHER))
    # the knee: 2 pp lost for 8.3x smaller and 3.3x faster (trial 2) is nearer the ideal point than 0.5 pp for
    # 3.3x and 2x (trial 1): in the normalised space 1 pp is a fifth of the accuracy axis
    assert found["knee"] == 2 and found["best_size_within_1pp"] == 1
    page = (tmp_path / "front.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "Pareto front" in page

    out, _ = autocomp_here(capsys, "pareto", "--storage", storage, "--study-name", "nsga2")
    assert "hypervolume" in out and "knee: trial 2 (val drop 2.00 pp, 12.0 KB, 8.33x smaller" in out

    out, _ = autocomp_here(capsys, "compare", "nsga2", "random", "--storage", storage, "--plot",
                           str(tmp_path / "both.png"))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert set(rows) == {"nsga2", "random"} and rows["random"][1:3] == ["2", "2"]  # complete, front
    hv = analysis.hypervolume([TRIALS[3], TRIALS[9]], TEACHER)
    assert float(rows["random"][4]) == pytest.approx(hv, abs=1e-3)
    assert "3.33x (trial 1)" in out and math.isclose(hv, 0.0) is False
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    _, err = autocomp_here(capsys, "compare", "nsga2", expect=2)
    assert err == "autocomp: error: STUDY must be a study YAML, or a study name with --storage, but got 'nsga2' " \
                  "without --storage.\n"
    _, err = autocomp_here(capsys, "pareto", "--storage", storage, "--study-name", "nsga2", "--plot", "x.pdf",
                           expect=2)
    assert err == "autocomp: error: --plot must end in one of ['.png', '.svg', '.html'], but got 'x.pdf'.\n"


def test_export_by_rule_names_the_trial_and_why_or_the_closest(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _study(storage, "s", TRIALS)
    source = ("--storage", storage, "--study-name", "s")
    out, _ = autocomp_here(capsys, "export", *source, "--max-drop", "1.0", "--minimize", "latency_ms",
                           "-o", str(tmp_path / "r.yaml"))
    assert out.startswith("trial 1: latency_ms smallest among val_drop_pp <= 1 (2 of 4 complete trials)")
    _, err = autocomp_here(capsys, "export", *source, "--max-size", "5KB", "-o", str(tmp_path / "x.yaml"),
                           expect=2)
    assert err.startswith("autocomp: error: No complete trial of study 's' has size_bytes <= 5000; closest: "
                          "trial 3 (size_bytes 8000)") and err.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists()
    _, err = autocomp_here(capsys, "export", *source, "--trial", "1", "--max-drop", "1", "-o", "x.yaml", expect=2)
    assert "--trial and --knee name the trial" in err
    _, err = autocomp_here(capsys, "export", *source, "-o", "x.yaml", expect=2)
    assert "Say which trial to export: --trial N, --knee, or a rule" in err
    _, err = autocomp_here(capsys, "export", *source, "--max-size", "lots", "-o", "x.yaml", expect=2)
    assert "argument --max-size: must be a size such as 50KB, 1.5MB or 20000 (bytes), but got 'lots'" in err


def test_a_trials_note_says_what_its_recipe_does_and_its_numbers_against_the_teacher():
    from autocomp.notes import describe, flat, trial_note
    from autocomp.recipe import LayerPrune, Prune, Quantize

    recipe = Recipe(task="digits", prune=Prune(layers={"conv1": LayerPrune(0.5, "l1"), "conv2": LayerPrune(0.8,
                                                                                                            "fpgm")}),
                    quantize=Quantize(bits=8, activation_bits=8, per_channel=True))
    said = describe(recipe)
    assert said[:2] == ["The teacher's own architecture.", "Prunes channels (local): conv1 0.50 l1, conv2 0.80 fpgm."]
    assert said[2].startswith("8-bit weights, int8 activations on ONNX Runtime's int8 kernels (per-channel symmetric")
    note = trial_note(7, recipe, TRIALS[5], TEACHER)
    assert note.startswith("## Trial 7: 3.33x smaller, 2.00x faster, -0.50 pp on validation\n\n"
                           "- The teacher's own architecture.\n- Prunes channels")
    assert "| size (ONNX file) | 100.0 KB | 30.0 KB (3.33x smaller) |" in note
    attrs = flat(TRIALS[5], recipe, {"size_bytes": 20_000})
    assert attrs["feasible"] == 0 and attrs["student"] == "teacher" and attrs["size_kb"] == 30.0
    assert all(isinstance(v, (int, float)) for k, v in attrs.items() if k != "student")  # sortable columns


def test_the_progress_bar_shows_the_fronts_size_its_hypervolume_and_the_budget_left(tmp_path):
    import time

    from autocomp.search.trials import budget_left, front_status

    study = _study(f"sqlite:///{tmp_path / 's.db'}", "s", TRIALS)
    hv = analysis.hypervolume(list(TRIALS.values()), TEACHER, "val")
    assert front_status(study) == f"front 4, HV {hv:.3f}"
    assert budget_left(time.time() + 125.5) == "budget left 2m05s" and budget_left(None) == ""


def test_load_rebuilds_a_recipe_whose_artifact_is_gone_or_changed(tmp_path, monkeypatch):
    import types

    import torch

    import autocomp
    import autocomp.pipeline
    from autocomp.runtime import export_onnx

    model = export_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), torch.zeros(1, 2, 2),
                        tmp_path / "model.onnx")
    recipe = Recipe(task="digits", provenance={"artifact": {"file": "r.onnx", "sha256": "0" * 64}})
    recipe.save(tmp_path / "r.yaml")
    (tmp_path / "r.onnx").write_bytes(model.read_bytes())  # not the artifact the digest names
    built = []
    monkeypatch.setattr(autocomp.pipeline, "apply", lambda recipe, task, out, progress: built.append(recipe.task)
                        or types.SimpleNamespace(artifact=model))
    loaded = autocomp.load(tmp_path / "r.yaml")
    assert built == ["digits"] and loaded.path == model  # rebuilt by apply, not the changed file
    assert loaded(torch.ones(5, 2, 2)).shape == (5, 3) and loaded.predict(torch.ones(5, 2, 2).numpy()).shape == (5,)
    assert autocomp.load(tmp_path).path == model  # a folder with model.onnx
    with pytest.raises(AutocompError, match="takes inputs of 3 axes"):
        loaded(torch.ones(2, 4))
    with pytest.raises(AutocompError, match="does not exist"):
        autocomp.load(tmp_path / "missing.yaml")


def test_a_recipes_artifact_cannot_name_a_file_outside_its_folder(tmp_path):
    import autocomp

    (tmp_path / "inner").mkdir()
    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    for name in ("../secret.onnx", "/etc/passwd", "..", "sub/x.onnx"):
        recipe = Recipe(task="digits", provenance={"artifact": {"file": name, "sha256": "0" * 64}})
        recipe.save(tmp_path / "inner" / "r.yaml")
        with pytest.raises(AutocompError, match="must name a file beside the recipe"):
            autocomp.load(tmp_path / "inner" / "r.yaml")
