"""Student families: every config a family's space can sample builds and runs on every input layout it takes."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
from torch import nn

from autocomp.compress.blocks import residual_blocks
from autocomp.compress.distill import TRANSFERS, Distiller, by_depth
from autocomp.compress.facts import teacher_facts
from autocomp.compress.student import STUDENTS, build_student, resolved
from autocomp.dimensions import Param
from autocomp.errors import ConfigError
from autocomp.features import layer_names
from autocomp.recipe import Prune, Student
from autocomp.space import SearchSpace
from autocomp.tasks.load import check_task
from tests import zoo

LAYOUTS = {"image": zoo.resnet, "rows": zoo.pre_ln_transformer, "signal": zoo.conv1d_flatten, "table": zoo.tabular_mlp}
TAKES = {"teacher": set(LAYOUTS), "mlp": set(LAYOUTS), "cnn": {"image", "rows", "signal"},
         "transformer": {"image", "rows", "signal"}}


def configs(name: str, samples: int = 12) -> list[dict]:
    """Every value of every knob of the family's own space (the others at their first), then random draws."""
    family = STUDENTS.get(name)
    dims = family.dimensions({knob: Param.parse(spec, knob) for knob, spec in family.space.items()})
    out = [family.decode({k: value if k == knob else p.candidates()[0] for k, p in dims.items()})
           for knob, param in dims.items() for value in param.candidates()]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        trial = study.ask()
        out.append(family.decode({k: p.suggest(trial, k) for k, p in dims.items()}))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("name", STUDENTS.names())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_sampled_config_builds_and_runs_on_the_task_input(name, layout):
    task = LAYOUTS[layout]()
    x = torch.cat([task.example_input, task.val.x[:3]])
    for config in configs(name):
        spec = Student(name, config)
        if layout not in TAKES[name]:
            with pytest.raises(ConfigError, match=r"`student.family '(cnn|transformer)'` needs an input of shape"):
                build_student(spec, task)
            return
        model = build_student(spec, task).eval()
        with torch.no_grad():
            assert model(x).shape == (4, task.teacher(x).shape[1]), (name, config)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_a_config_encodes_to_the_dimension_values_that_decode_back_to_it(name):
    family = STUDENTS.get(name)
    for config in configs(name, samples=4):
        values = family.encode(config)
        assert family.decode(values) == config


def test_a_derived_student_of_a_residual_model_runs_after_dropping_blocks():
    task = zoo.resnet()
    blocks = residual_blocks(task.teacher, task.example_input)
    assert len(blocks) >= 2
    names = set(layer_names(task.teacher))
    for depth, width in [(0.5, 1.0), (0.0, 0.5), (1.0, 0.25)]:
        student = build_student(Student("teacher", {"depth": depth, "width": width}), task).eval()
        kept = residual_blocks(student, task.example_input)
        assert len(kept) == len(blocks) - round((1 - depth) * len(blocks))
        assert set(layer_names(student)) <= names  # the teacher's names: a recipe may name its layers
        teacher_params = sum(p.numel() for p in task.teacher.parameters())
        assert sum(p.numel() for p in student.parameters()) < teacher_params or (depth, width) == (1.0, 1.0)
        with torch.no_grad():
            assert student(task.val.x[:5]).shape == task.teacher(task.val.x[:5]).shape


def test_init_keeps_the_teachers_weights_or_starts_afresh():
    task = zoo.resnet()
    kept = build_student(Student("teacher", {"width": 1.0}), task)
    fresh = build_student(Student("teacher", {"width": 1.0}, init="scratch"), task)
    again = build_student(Student("teacher", {"width": 1.0}, init="scratch"), task)
    for (name, t), k, f, a in zip(task.teacher.state_dict().items(), kept.state_dict().values(),
                                  fresh.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(t, k) and torch.equal(f, a), name  # teacher weights; scratch is seeded
    changed = [n for n, t in task.teacher.named_parameters() if not torch.equal(t, fresh.get_parameter(n))]
    assert len(changed) == len(list(task.teacher.parameters()))  # every parameter drawn afresh
    with pytest.raises(ConfigError, match=r"`init` must be one of \['scratch'\], but got 'teacher'"):
        resolved(Student("cnn", init="teacher"))  # a new network has no teacher's weights to keep


@pytest.mark.parametrize("kind", [k for k in TRANSFERS.names() if k not in ("none", "logits")])
def test_every_distillation_kind_transfers_between_different_architectures(kind):
    task = zoo.pre_ln_transformer() if kind == "attention_matrix" else zoo.resnet()
    student = build_student(Student("cnn", {"depth": [1, 2], "width": [8, 16], "residual": True}), task)
    if kind == "attention_matrix":
        student = build_student(Student("transformer", {"layers": 1, "heads": 2, "width": 16}), task)
    hints = [n for n in layer_names(student)][:-1]
    pairs = by_depth(hints, layer_names(task.teacher)[:-1])
    x, y = task.train.x[:16], task.train.y[:16]
    with Distiller(task.teacher, student, task.example_input, kind=kind, pairs=pairs) as loss:
        value = loss(student.train()(x), x, y)
        ce = nn.functional.cross_entropy(student(x), y)
        value.backward()
    assert torch.isfinite(value) and value.item() != pytest.approx(ce.item(), abs=1e-6)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_a_space_samples_every_family_in_every_trial_and_decodes_its_students():
    space = SearchSpace.from_dict({"schema_version": 1, "prune": {"sparsity": [0.0, 0.3]},
                                   "student": {"family": ["teacher", "cnn", "mlp", "transformer"],
                                               "init": ["teacher", "scratch"], "cnn": {"stages": [1, 2]}}})
    prunable = {}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        recipe = space.sample(trial, "t", prunable)
        study.tell(trial, 0.0)
        seen.add(recipe.student.family)
        free = {name for name, param in space.dimensions(prunable, "t").items() if not param.fixed}
        assert set(trial.params) == free  # the same dimensions in every trial
        if recipe.student.family != "teacher":
            assert recipe.student.init == "scratch" and recipe.prune == Prune()  # its widths are its knobs
        assert dataclasses.replace(recipe.student) == Student(**dataclasses.asdict(recipe.student))
    assert seen == {"teacher", "cnn", "mlp", "transformer"}
    assert {t.params["student.cnn.stages"] for t in study.trials} == {1, 2}


@pytest.mark.parametrize(("student", "message"), [
    ({"family": ["cnn"], "mlp": {"depth": [1]}}, "`space.student.mlp` gives the knobs of a family that"),
    ({"family": ["cnn"], "cnn": {"widht": [8]}}, "`space.student.cnn.widht` is not a known field.*Did you mean"),
    ({"family": ["cnn"], "cnn": {"kernel": [3, 4]}}, r"`space.student.cnn.kernel` must be one of \[1, 3, 5, 7\]"),
    ({"family": ["cnn"], "config": {}}, "`space.student.config` is searched per family"),
    ({"family": ["cnnn"]}, "`space.student.family` must name a registered student family"),
])
def test_a_bad_student_space_is_refused_in_one_line(student, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict({"schema_version": 1, "student": student})


def test_families_a_tabular_input_cannot_take_are_narrowed_out_of_the_shipped_space():
    from autocomp.search.trials import narrow_to_model
    from tests.conftest import ROOT

    space = SearchSpace.load(ROOT / "search_spaces" / "nas_kd.yaml")
    lines = narrow_to_model(space, zoo.tabular_mlp(), "tabular")
    assert [line for line in lines if line.startswith("space.student.family")] == [
        "space.student.family narrowed from ['teacher', 'cnn', 'mlp', 'transformer'] to ['teacher', 'mlp', "
        "'transformer']: the 'tabular' model has input (30,), which 'cnn' cannot take",
        "space.student.family narrowed from ['teacher', 'mlp', 'transformer'] to ['teacher', 'mlp']: the 'tabular' "
        "model has input (30,), which 'transformer' cannot take"]
    assert space.families() == ["teacher", "mlp"]
    assert not any(name.startswith(("student.cnn.", "student.transformer.")) for name in space.dimensions({}, "t"))
    image = SearchSpace.load(ROOT / "search_spaces" / "nas_kd.yaml")
    assert not [line for line in narrow_to_model(image, zoo.resnet(), "resnet") if "student" in line]


def test_the_shipped_joint_space_is_narrowed_to_the_families_a_task_names_for_its_data():
    from autocomp.search.trials import narrow_to_model
    from tests.conftest import ROOT

    resnet = zoo.resnet()
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    assert not [line for line in narrow_to_model(space, resnet, "resnet") if "student" in line]  # names none
    named = dataclasses.replace(resnet, students=("cnn",))
    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    lines = [line for line in narrow_to_model(space, named, "resnet") if line.startswith("space.student.family")]
    assert lines[-1] == ("space.student.family narrowed from ['teacher', 'cnn', 'transformer'] to ['teacher', "
                         "'cnn']: the 'resnet' model names ['cnn'] as the student families that fit its data "
                         "(Task.students)")
    assert space.families() == ["teacher", "cnn"]
    only_mlp = SearchSpace.from_dict({"schema_version": 1, "student": {"family": ["teacher", "mlp"]}})
    assert not narrow_to_model(only_mlp, named, "resnet")  # what a space writes and the task does not name: kept
    with pytest.raises(ConfigError, match="`Task.students` must name a registered student family.*'cnnn'"):
        check_task(dataclasses.replace(resnet, students=("cnnn",)), "resnet")


def test_a_student_from_scratch_trains_for_the_longest_fine_tune_and_the_teacher_for_its_level():
    from tests.conftest import ROOT

    space = SearchSpace.load(ROOT / "search_spaces" / "joint.yaml")
    task = zoo.resnet()
    prunable = teacher_facts(task).prunable
    dims = space.dimensions(prunable, "resnet")
    values = {name: param.candidates()[0] for name, param in dims.items()} | {"prune.sparsity": 0.25}
    assert space.decode(values, "resnet", prunable).finetune.epochs == 3  # ceil(0.25 x 12)
    scratch = space.decode(values | {"student.family": "cnn"}, "resnet", prunable)
    assert (scratch.student.init, scratch.finetune.epochs) == ("scratch", 12)


@pytest.fixture
def user_module():
    """The user's module imported afresh by the test, and its family gone afterwards (the process's registry is
    what ``autocomp methods`` in a new process must still match)."""
    import sys

    before = dict(STUDENTS._entries)
    sys.modules.pop("tests.user_student", None)
    yield
    STUDENTS._entries.clear()
    STUDENTS._entries.update(before)
    sys.modules.pop("tests.user_student", None)


def test_a_user_task_brings_its_own_family_which_its_recipes_and_spaces_name(tmp_path, user_module):
    from autocomp.pipeline import apply
    from autocomp.recipe import Recipe

    recipe = Recipe.from_dict({"schema_version": 1, "task": "tests.user_student:task",  # imports the module first
                               "student": {"family": "tiny_mlp", "config": {"width": 4}}, "finetune": {"epochs": 1}})
    from tests.user_student import task

    result = apply(recipe, task(), tmp_path, progress=False)
    assert result.metrics["params"] == 64 * 4 + 4 + 4 * 10 + 10
    space = SearchSpace.from_dict({"schema_version": 1, "student": {"family": ["tiny_mlp"],
                                                                    "tiny_mlp": {"width": [4, 16]}}})
    assert space.dimensions({}, "t")["student.tiny_mlp.width"].candidates() == [4, 16]
