from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocomp.compress.distill import (
    TRANSFERS,
    AttentionTransfer,
    Distiller,
    EnsembleTargets,
    FitNet,
    RelationalKD,
    SimilarityPreserving,
    TeacherTargets,
)
from autocomp.train import Split, fit, predict
from tests.conftest import prune_local

X = torch.zeros(1, 1, 8, 8)


def batch(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rkd_is_zero_for_a_scaled_copy_of_the_teachers_embeddings():
    teacher = batch(16, 32)
    assert RelationalKD()([3.7 * teacher], [teacher]).item() < 1e-6
    assert RelationalKD()([batch(16, 32, seed=1)], [teacher]).item() > 1e-3


def test_attention_transfer_ignores_scale_but_not_where_the_activity_is():
    teacher = batch(4, 8, 5, 5).abs()
    assert AttentionTransfer()([2.0 * teacher[:, :3]], [teacher[:, :3]]).item() < 1e-10  # other width, same map
    moved = torch.roll(teacher, shifts=2, dims=3)
    assert AttentionTransfer()([moved], [teacher]).item() > 1e-3


def test_similarity_preserving_is_zero_under_a_rotation_of_the_channels():
    teacher = batch(8, 6)
    rotation, _ = torch.linalg.qr(batch(6, 6, seed=2))  # orthogonal: F R R^T F^T = F F^T
    assert SimilarityPreserving()([teacher @ rotation], [teacher]).item() < 1e-10
    assert SimilarityPreserving()([batch(8, 6, seed=3)], [teacher]).item() > 1e-3


def test_fitnet_learns_a_projection_between_widths():
    teacher = batch(64, 8, 4, 4)
    student = torch.einsum("bchw,dc->bdhw", teacher, batch(5, 8, seed=4))  # 5 channels, a linear map of 8
    hint = FitNet()
    hint.build([student], [teacher])
    assert isinstance(hint.projections[0], nn.Conv2d) and hint.projections[0].weight.shape == (8, 5, 1, 1)
    optimizer = torch.optim.Adam(hint.parameters(), lr=0.05)
    first = hint([student], [teacher]).item()
    for _ in range(200):
        loss = hint([student], [teacher])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first  # 8 channels seen through 5 cannot be recovered exactly


def test_logits_kinds_reduce_to_their_definitions(small_cnn):
    student = copy.deepcopy(small_cnn)
    x, y = batch(8, 1, 8, 8), torch.arange(8)
    logits = student(x)
    with Distiller(small_cnn, student, X, kind="none", alpha=0.9) as none:
        assert torch.allclose(none(logits, x, y), nn.functional.cross_entropy(logits, y))
    with Distiller(small_cnn, student, X, kind="logits", alpha=1.0, temperature=2.0) as soft:
        p_t = torch.softmax(small_cnn(x) / 2.0, 1)
        kl = (p_t * (p_t.log() - torch.log_softmax(logits / 2.0, 1))).sum(1).mean()
        assert torch.allclose(soft(logits, x, y), 4.0 * kl, atol=1e-6)


def test_soft_targets_are_read_by_index_when_no_feature_term_needs_the_teacher(small_cnn):
    student = copy.deepcopy(small_cnn)
    data = Split(batch(32, 1, 8, 8), torch.arange(32) % 10)
    idx = torch.tensor([5, 0, 17, 3])
    x, y = data.x[idx], data.y[idx]
    logits = student(x)
    cached = predict(small_cnn, data.x)
    with Distiller(small_cnn, student, X, kind="logits", teacher_logits=cached) as read, \
            Distiller(small_cnn, student, X, kind="logits") as run:
        assert torch.allclose(read(logits, x, y, idx), run(logits, x, y, idx), atol=1e-6)
    with Distiller(small_cnn, student, X, kind="logits", teacher_logits=torch.zeros_like(cached)) as wrong:
        assert not torch.allclose(wrong(logits, x, y, idx), run(logits, x, y, idx), atol=1e-3)  # the cache is read
    with Distiller(small_cnn, student, X, kind="fitnet", teacher_logits=torch.zeros_like(cached),
                   pairs=[("conv1", "conv1")]) as hints, \
            Distiller(small_cnn, student, X, kind="fitnet", pairs=[("conv1", "conv1")]) as ran:
        hints.load_state_dict(ran.state_dict())  # the same projection
        student(x)
        assert torch.allclose(hints(logits, x, y, idx), ran(logits, x, y, idx), atol=1e-6)  # a feature term runs it


def test_multi_teacher_targets_are_the_mean_of_the_teachers_softened_outputs(small_cnn):
    """Multi-teacher distillation's soft targets: the ensemble's mean softened output, whether a teacher's logits are
    read by index or its forward runs; the student's soft term is taken against that mean."""
    torch.manual_seed(1)
    teachers = [small_cnn, *(type(small_cnn)().eval() for _ in range(2))]
    data = Split(batch(32, 1, 8, 8), torch.arange(32) % 10)
    idx = torch.tensor([5, 0, 17, 3])
    x, y = data.x[idx], data.y[idx]
    ensemble = EnsembleTargets([TeacherTargets(teachers[0], predict(teachers[0], data.x)),
                                *(TeacherTargets(t) for t in teachers[1:])])
    mean = torch.stack([torch.softmax(t(x) / 3.0, 1) for t in teachers]).mean(0).detach()
    torch.testing.assert_close(ensemble.log_probs(x, idx, 3.0).exp(), mean, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mean, torch.softmax(teachers[0](x) / 3.0, 1), atol=1e-3)  # not one teacher's

    student = copy.deepcopy(small_cnn)
    logits = student(x)
    with Distiller(small_cnn, student, X, kind="logits", alpha=1.0, temperature=3.0, targets=ensemble) as soft:
        kl = (mean * (mean.log() - torch.log_softmax(logits / 3.0, 1))).sum(1).mean()
        torch.testing.assert_close(soft(logits, x, y, idx), 9.0 * kl, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one teacher"):
        EnsembleTargets([])


@pytest.mark.parametrize("kind", TRANSFERS.names())
def test_every_kind_fine_tunes_a_pruned_student_and_leaves_no_hooks(small_cnn, kind):
    student = prune_local(copy.deepcopy(small_cnn), {"conv1": (0.5, "l1"), "conv2": (0.5, "l1"), "fc1": (0.5, "l1")},
                    Split(X, torch.zeros(1, dtype=torch.long)))
    data = Split(batch(64, 1, 8, 8), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0)))
    pairs = [(n, n) for n in ("conv1", "conv2", "fc1")]
    with Distiller(small_cnn, student, X, kind=kind, weight=10.0, pairs=pairs) as loss:
        learned = [p.detach().clone() for p in loss.parameters()]  # FitNet's projections
        before = loss(student.train()(data.x), data.x, data.y).item()
        fit(student, data, loss, epochs=3, lr=1e-2, batch_size=16, progress=False)
        after = loss(student.train()(data.x), data.x, data.y).item()
    assert after < before
    assert all(not p.equal(q) for p, q in zip(loss.parameters(), learned, strict=True))  # trained with the student
    assert (kind == "fitnet") == bool(learned)
    for module in [*small_cnn.modules(), *student.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
