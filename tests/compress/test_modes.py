"""The distillation modes (``autocomp.compress.modes``), each by its defining property."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from autocomp.compress.distill import EnsembleTargets
from autocomp.compress.modes import (
    ASSISTANT,
    MODES,
    Cohort,
    FromTeacher,
    Mutual,
    Self,
    Trained,
    cached_assistant,
    logits_of,
)
from autocomp.compress.student import build_student, resolved
from autocomp.errors import ConfigError
from autocomp.methods import catalogue, check_recipe
from autocomp.pipeline import checked_mode
from autocomp.recipe import Distill, FineTune, Recipe, Student
from autocomp.train import Split, fit, predict
from tests.conftest import SmallCNN

SPEC = Distill(alpha=0.7, temperature=3.0)


def soft(logits: torch.Tensor, t: float) -> torch.Tensor:
    return torch.softmax(logits / t, dim=1)


def by_hand(logits: torch.Tensor, targets: torch.Tensor, y: torch.Tensor, spec: Distill) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL(targets || softmax(logits / T)), ``targets`` probabilities."""
    t = spec.temperature
    kl = (targets * (targets.log() - torch.log_softmax(logits / t, dim=1))).sum(1).mean()
    return (1 - spec.alpha) * nn.functional.cross_entropy(logits, y) + spec.alpha * t**2 * kl


def small(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def data(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_every_mode_is_listed_with_what_it_does_and_the_lecture_it_implements():
    listed = {m["name"]: m["description"] for m in catalogue()["distill.mode"]}
    assert set(listed) == {"offline", "multi_teacher", "born_again", "mutual", "self", "assistant"}
    assert all(". Lecture: " in d for d in listed.values()), listed


def test_a_mode_refuses_the_kinds_it_does_not_combine_with_in_one_line():
    check_recipe(Recipe(task="digits", distill=Distill(mode="mutual", kind="logits")))
    check_recipe(Recipe(task="digits", distill=Distill(mode="offline", kind="fitnet")))
    with pytest.raises(ConfigError, match=r"recipe\.distill\.kind.* of the kinds the distillation mode 'mutual' "
                                          r"combines with \('logits',\), but got 'fitnet'"):
        check_recipe(Recipe(task="digits", distill=Distill(mode="mutual", kind="fitnet")))
    with pytest.raises(ConfigError, match=r"recipe\.distill\.mode.*registered distillation mode.*'online'"):
        check_recipe(Recipe(task="digits", distill=Distill(mode="online")))
    with pytest.raises(ConfigError, match=r"recipe\.distill\.peers.* read by the distillation mode 'mutual' only, but "
                                          r"the mode is 'offline'"):
        check_recipe(Recipe(task="digits", distill=Distill(peers=2)))


def test_the_new_fields_leave_a_recipes_canonical_text_at_their_defaults():
    plain = Recipe(task="digits")
    assert '"mode"' not in plain.canonical() and '"generations"' not in plain.canonical()
    assert '"mode": "mutual"' in Recipe(task="digits", distill=Distill(mode="mutual")).canonical()
    assert Recipe(task="digits", distill=Distill(generations=3)).canonical() != plain.canonical()


def test_mutual_learning_updates_every_network_and_each_loss_holds_the_others_soft_targets():
    student, peers = small(0), [small(1), small(2)]
    before = [copy.deepcopy(m.state_dict()) for m in (student, *peers)]
    cohort = Cohort(peers, SPEC)
    split = data()
    x, y = split.x[:16], split.y[:16]
    student.train()
    every = [student(x), *(p(x) for p in peers)]
    # the paper's loss: each network's whole cross-entropy, plus alpha T^2 KL to the mean of the others' soft outputs
    lossless = dataclasses.replace(SPEC, alpha=1.0)
    expected = sum(nn.functional.cross_entropy(z, y) + SPEC.alpha * by_hand(
        z, torch.stack([soft(o, 3.0) for j, o in enumerate(every) if j != i]).mean(0), y, lossless)
        for i, z in enumerate(every))
    assert torch.allclose(cohort(every[0], x, y), expected, atol=1e-5)
    # each network's gradient is its own term's: the others' soft targets are constants
    student.zero_grad()
    cohort.zero_grad()
    cohort(student(x), x, y).backward()
    grads = [m.fc2.weight.grad.clone() for m in (student, *peers)]
    assert all(g.abs().sum() > 0 for g in grads)
    fit(student, split, cohort, epochs=1, lr=1e-2, batch_size=16, progress=False)
    after = [m.state_dict() for m in (student, *peers)]
    for old, new in zip(before, after, strict=True):
        assert any(not torch.equal(old[k], new[k]) for k in old if old[k].is_floating_point())


def test_self_distillations_shallow_classifiers_learn_from_the_same_networks_deepest_output():
    student, split = small(0), data()
    pairs = [(n, n) for n in ("conv1", "conv2", "fc1", "fc2")]
    task = type("T", (), {"example_input": split.x[:1]})()
    with Self().loss(student, task, SPEC, pairs) as loss:  # every hint layer but the deepest
        assert loss.layers == ["conv1", "conv2", "fc1"]
        x, y = split.x[:16], split.y[:16]
        logits = student.train()(x)
        own = soft(logits.detach(), SPEC.temperature)  # the targets: this network's own deepest output
        feats = [loss._tap.values["conv1"].mean((2, 3)), loss._tap.values["conv2"].mean((2, 3)),
                 loss._tap.values["fc1"]]
        expected = nn.functional.cross_entropy(logits, y) + sum(
            by_hand(head(f), own, y, SPEC) for head, f in zip(loss.heads, feats, strict=True))
        assert torch.allclose(loss(logits, x, y), expected, atol=1e-5)
        fit(student, split, loss, epochs=1, lr=1e-2, batch_size=16, progress=False)
    assert set(student.state_dict()) == set(SmallCNN().state_dict())  # the classifiers are the loss's, not the model's
    assert all(h.weight.grad is not None for h in loss.heads)
    with pytest.raises(ConfigError, match=r"recipe\.distill\.mode.*'self' needs a student with at least two hint "
                                          r"layers.*but got 1"):
        Self().loss(student, task, SPEC, [("fc2", "fc2")])


class Recorder:
    """A stand-in for the pipeline's compression that records what each pass learned from and returns a fresh
    network of the recipe's student."""

    def __init__(self, task) -> None:
        self.task, self.calls = task, []

    def __call__(self, recipe: Recipe, lesson, generation: int) -> Trained:
        model = build_student(recipe.student, self.task, seed=100 + len(self.calls)).eval()
        self.calls.append((recipe, lesson, generation, model))
        return Trained(model, [recipe.finetune.epochs])


@pytest.fixture
def recipe() -> Recipe:
    return check_recipe(Recipe(task="digits", student=Student("cnn", {"depth": [1], "width": [8]}),
                               finetune=FineTune(epochs=1)))


def test_born_again_runs_its_generations_each_distilled_from_the_one_before(digits_task, recipe):
    compress = Recorder(digits_task)
    recipe = dataclasses.replace(recipe, distill=Distill(mode="born_again", generations=3))
    trained = MODES.get("born_again").run(recipe, digits_task, compress, [])
    assert [g for _, _, g, _ in compress.calls] == [0, 1, 2]
    teachers = [lesson.teacher for _, lesson, _, _ in compress.calls]
    assert teachers[0] is digits_task.teacher
    for (_, lesson, _, _), (_, _, _, previous) in zip(compress.calls[1:], compress.calls[:-1], strict=True):
        assert lesson.teacher is previous
        assert torch.equal(lesson.logits, predict(previous, digits_task.train.x))
    assert trained.model is compress.calls[-1][3]


def test_the_assistant_is_trained_first_cached_and_the_students_teacher(digits_task, recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    recipe = dataclasses.replace(recipe, distill=Distill(mode="assistant", assistant_epochs=3))
    compress = Recorder(digits_task)
    MODES.get("assistant").run(recipe, digits_task, compress, [])
    (helper, first, _, assistant), (student, second, _, _) = compress.calls
    assert helper.student == resolved(ASSISTANT) and helper.finetune.epochs == 3 and helper.prune.layers == {}
    # none of the trial's continuous dimensions: the defaults of a fine-tune and of distillation
    assert helper.finetune.lr == FineTune().lr and (helper.distill.alpha, helper.distill.temperature) == (0.5, 4.0)
    assert first.teacher is digits_task.teacher  # the assistant learns from the teacher
    assert student is recipe and isinstance(second, FromTeacher)
    assert all(torch.equal(a, b) for a, b in zip(second.teacher.state_dict().values(),
                                                  assistant.state_dict().values(), strict=True))
    assert torch.equal(second.logits, logits_of(assistant, digits_task))
    again = Recorder(digits_task)
    cached = cached_assistant(recipe, digits_task, again)  # cached by its digest: not trained again
    assert again.calls == [] and all(torch.equal(a, b) for a, b in zip(
        cached.state_dict().values(), assistant.state_dict().values(), strict=True))
    longer = dataclasses.replace(recipe, distill=Distill(mode="assistant", assistant_epochs=4))
    cached_assistant(longer, digits_task, again)
    assert len(again.calls) == 1  # another recipe for it: another assistant


def linear_teacher(task) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fit(model, task.train, lambda z, x, y, i: nn.functional.cross_entropy(z, y), epochs=2, lr=1e-2, progress=False)
    return model.eval()


def test_multi_teacher_averages_the_task_teachers_and_is_refused_without_extra_ones(digits_task, recipe):
    recipe = dataclasses.replace(recipe, distill=Distill(mode="multi_teacher"))
    with pytest.raises(ConfigError, match=r"recipe\.distill\.mode.*'multi_teacher' needs extra teachers"):
        checked_mode(recipe, digits_task)
    extra = linear_teacher(digits_task)
    task = dataclasses.replace(digits_task, teachers=(extra,))
    mode, teachers = checked_mode(recipe, task)
    assert teachers == [extra]
    compress = Recorder(task)
    mode.run(recipe, task, compress, teachers)
    (_, lesson, _, _), = compress.calls
    assert isinstance(lesson.targets, EnsembleTargets)
    x, idx = task.train.x[:8], torch.arange(8)
    expected = (soft(predict(task.teacher, x), 4.0) + soft(predict(extra, x), 4.0)) / 2
    assert torch.allclose(lesson.targets.log_probs(x, idx, 4.0).exp(), expected, atol=1e-5)


def test_a_study_made_with_other_extra_teachers_is_not_mixed_with_this_ones(digits_task):
    from autocomp.search.trials import fingerprint_mismatch

    task = dataclasses.replace(digits_task, teachers=(linear_teacher(digits_task),))
    said = fingerprint_mismatch(digits_task.fingerprint(), task.fingerprint(), "study 's'")
    assert said.startswith("study 's' was made with teachers_sha256 none..., but this task's is ")
    assert fingerprint_mismatch(task.fingerprint(), task.fingerprint(), "study 's'") is None


def test_extra_teachers_named_by_the_recipe_must_hold_the_tasks_data(digits_task, recipe):
    named = dataclasses.replace(recipe, distill=Distill(mode="multi_teacher", teachers=["tests.tasks:digits_linear"]))
    _, teachers = checked_mode(named, digits_task)
    assert len(teachers) == 1 and isinstance(teachers[0], nn.Sequential)
    other = dataclasses.replace(recipe, distill=Distill(mode="multi_teacher", teachers=["tests.tasks:plateau"]))
    with pytest.raises(ConfigError, match=r"recipe\.distill\.teachers\[0\].*same data as 'digits'.*other data"):
        checked_mode(other, digits_task)


def test_mutual_peers_are_the_students_architecture_freshly_initialised(digits_task, recipe):
    recipe = dataclasses.replace(recipe, distill=Distill(mode="mutual", peers=2))
    compress = Recorder(digits_task)
    MODES.get("mutual").run(recipe, digits_task, compress, [])
    (_, lesson, _, student), = compress.calls
    assert isinstance(lesson, Mutual) and len(lesson.peers) == 2
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    for peer in lesson.peers:
        assert {k: v.shape for k, v in peer.state_dict().items()} == shapes
    assert not torch.equal(lesson.peers[0].state_dict()["0.0.weight"], lesson.peers[1].state_dict()["0.0.weight"])
