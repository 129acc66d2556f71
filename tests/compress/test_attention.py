"""Attention is pruned by whole positions of every head: ``nn.MultiheadAttention`` on the residual stream's group,
hand-written attention (q, k, v Linear layers reshaped into heads) on its own group, whose head count is found by
running the model. Afterwards every attention layer is consistent (heads x head_dim = width), the model runs and
exports to ONNX Runtime with torch's numbers. A group the forward cannot lose channels of is left out, said once."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocomp.compress.prune import prunable_layers, prune
from autocomp.recipe import LayerPrune, Prune
from autocomp.runtime import export_onnx
from autocomp.train import Split
from tests.tasks import FixedView
from tests.zoo import Encoder, LinearTransformer

X = torch.randn(1, 8, 8)


def data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(16, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))


def pruned(model: nn.Module, sparsity: float, groups: set[str] | None = None) -> nn.Module:
    """``model`` with each of ``groups`` (default: all) pruned to ``sparsity`` by L1."""
    layers = prunable_layers(model, X)
    groups = {layer.group for layer in layers.values()} if groups is None else groups
    return prune(model, X, Prune(layers={name: LayerPrune(sparsity, "l1") for name in groups}), layers, data())


def assert_runs_as_exported(model: nn.Module, tmp_path) -> None:
    x = torch.randn(3, 8, 8)
    sess = ort.InferenceSession(str(export_onnx(model, X, tmp_path / "model.onnx")))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_multihead_attention_loses_the_same_positions_of_every_head(norm_first, tmp_path):
    torch.manual_seed(0)
    model = Encoder(norm_first=norm_first).eval()
    layers = prunable_layers(model, X)
    assert {(layer.group, layer.channels, layer.divisor) for layer in layers.values()} == {
        ("embed", 32, 4), ("encoder.layers.0.linear1", 64, 1), ("encoder.layers.1.linear1", 64, 1)}
    pruned(model, 0.5)
    for block in model.encoder.layers:
        attn = block.self_attn
        assert attn.embed_dim == 16 and attn.num_heads == 4 and attn.head_dim * attn.num_heads == attn.embed_dim
        assert attn.in_proj_weight.shape == (48, 16) and attn.out_proj.weight.shape == (16, 16)
        assert block.linear1.out_features == 32 and block.norm1.normalized_shape == (16,)
    assert model.embed.out_features == 16 and model.position.shape == (1, 8, 16)
    assert_runs_as_exported(model, tmp_path)


def test_hand_written_attention_finds_its_heads_by_running_the_model(tmp_path):
    torch.manual_seed(0)
    model = LinearTransformer().eval()
    layers = prunable_layers(model, X)
    assert layers["attn.q"].group == layers["attn.v"].group == "attn.q" and layers["attn.q"].divisor == 4
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in ("attn.q", "attn.out")}
    pruned(model, 0.5, {"attn.q"})
    assert [model.get_submodule(f"attn.{p}").out_features for p in "qkv"] == [16] * 3
    assert model.attn.out.in_features == 16 and model.attn.out.out_features == 32
    kept = [next(i for i, row in enumerate(weights["attn.q"]) if torch.equal(row, new)) for new in model.attn.q.weight]
    assert [k % 8 for k in kept[:4]] == [k % 8 for k in kept[4:8]] == [k % 8 for k in kept[12:]]  # every head alike
    assert [k // 8 for k in kept] == [h for h in range(4) for _ in range(4)]
    torch.testing.assert_close(model.attn.out.weight, weights["attn.out"][:, kept])
    assert_runs_as_exported(model, tmp_path)


def test_a_group_the_forward_cannot_lose_is_left_out_and_said():
    torch.manual_seed(0)
    said: list[str] = []
    layers = prunable_layers(FixedView().eval(), torch.zeros(1, 1, 8, 8), left_out=said)
    assert "conv2" not in layers and "fc1" in layers  # reshape(-1, 256) fixes conv2's 16 channels
    assert said == ["group 'conv2' (conv2) is not pruned: the model's forward fails or changes its output shape "
                    "once any of its 16 channels go"]


@pytest.mark.parametrize("kind", ["fitnet", "attention", "sp", "rkd"])
def test_every_feature_kind_distils_a_transformers_token_features(kind):
    """Linear layers' (batch, tokens, channels) outputs as hints: a copy of the teacher has no transfer loss, a
    student whose MLP lost half its hidden units (32 of 64 channels) is compared channel to channel."""
    import copy

    from autocomp.compress.distill import Distiller

    torch.manual_seed(0)
    teacher = Encoder(norm_first=True).eval()
    x, y = torch.randn(4, 8, 8), torch.tensor([0, 1, 2, 3])
    hints = ["encoder.layers.0.linear1", "encoder.layers.1.linear2"]
    for student, zero in [(copy.deepcopy(teacher), True),
                          (pruned(copy.deepcopy(teacher), 0.5, {"encoder.layers.0.linear1"}), False)]:
        pairs = [(n, n) for n in hints]
        with Distiller(teacher, student, X, kind=kind, alpha=0.0, weight=1.0, pairs=pairs) as loss, torch.no_grad():
            logits = student.eval()(x)
            transfer = float(loss(logits, x, y) - nn.functional.cross_entropy(logits, y))
        assert transfer == pytest.approx(0.0, abs=1e-5) if zero else (0.0 < transfer < float("inf"))


def attention_matrix_loss(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    from autocomp.compress.distill import Distiller

    with Distiller(teacher, student, X, kind="attention_matrix", alpha=0.0, weight=1.0) as loss, torch.no_grad():
        logits = student.eval()(x)
        return float(loss(logits, x, torch.zeros(len(x), dtype=torch.long))
                     - nn.functional.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long)))


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_the_attention_matrix_loss_is_the_mean_squared_difference_of_the_maps(norm_first):
    """Zero for a copy of the teacher; unchanged by what does not enter the maps (the values, the output
    projection, a bias added to every key); the definition's value for a student with other query weights."""
    import copy

    torch.manual_seed(0)
    teacher, x = Encoder(norm_first=norm_first).eval(), torch.randn(5, 8, 8)
    assert attention_matrix_loss(teacher, copy.deepcopy(teacher), x) == pytest.approx(0.0, abs=1e-7)
    one_layer = Encoder(norm_first=norm_first, layers=1).eval()  # one layer: a change reaches no later layer's input
    invariant, other = copy.deepcopy(one_layer), copy.deepcopy(one_layer)
    with torch.no_grad():
        attn, e = invariant.encoder.layers[0].self_attn, 32
        attn.in_proj_weight[2 * e:] *= 3.0  # values
        attn.in_proj_bias[e : 2 * e] += 5.0  # the same shift of every key: softmax does not see it
        attn.out_proj.weight.mul_(-2.0)
        other.encoder.layers[0].self_attn.in_proj_weight[:8] *= 4.0  # head 0's queries only
    assert attention_matrix_loss(one_layer, invariant, x) == pytest.approx(0.0, abs=1e-6)
    maps = []
    for model in (other, one_layer):
        with torch.no_grad():
            h = model.embed(x) + model.position
            block = model.encoder.layers[0]
            h = block.norm1(h) if norm_first else h
            maps.append(block.self_attn(h, h, h, need_weights=True, average_attn_weights=False)[1])
    expected = float((maps[0] - maps[1]).pow(2).sum(-1).mean())  # (batch, heads, queries, keys)
    assert expected > 0 and attention_matrix_loss(one_layer, other, x) == pytest.approx(expected, rel=1e-5)


def test_the_attention_matrix_loss_trains_only_what_enters_the_maps():
    from autocomp.compress.distill import Distiller

    torch.manual_seed(0)
    teacher, student = Encoder(norm_first=True).eval(), Encoder(norm_first=True)
    x, y = torch.randn(5, 8, 8), torch.zeros(5, dtype=torch.long)
    with Distiller(teacher, student, X, kind="attention_matrix", alpha=0.0, weight=1.0) as loss:
        logits = student.train()(x)
        (loss(logits, x, y) - nn.functional.cross_entropy(logits, y)).backward()  # the attention term alone
    last = student.encoder.layers[1]
    assert last.self_attn.in_proj_weight.grad[:64].abs().sum() > 0  # its queries and keys
    assert not last.linear2.weight.grad.abs().sum() and not student.head.weight.grad.abs().sum()  # after every map


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_the_hidden_state_loss_projects_the_students_layer_outputs_onto_the_teachers(norm_first):
    """Zero for a copy (no projection where widths agree); for a student whose residual stream lost half its width,
    the mean over layers of MSE(W h_student, h_teacher) with the learned 16 -> 32 projections."""
    import copy

    from autocomp.compress.distill import Distiller

    torch.manual_seed(0)
    teacher, x, y = Encoder(norm_first=norm_first).eval(), torch.randn(5, 8, 8), torch.zeros(5, dtype=torch.long)

    def hidden(model: nn.Module) -> list[torch.Tensor]:
        h, out = model.embed(x) + model.position, []
        for layer in model.encoder.layers:
            h = layer(h)
            out.append(h)
        return out

    for student in (copy.deepcopy(teacher), pruned(copy.deepcopy(teacher), 0.5, {"embed"})):
        with Distiller(teacher, student, X, kind="hidden", alpha=0.0, weight=1.0) as loss, torch.no_grad():
            logits = student.eval()(x)
            found = float(loss(logits, x, y) - nn.functional.cross_entropy(logits, y))
            expected = torch.stack([nn.functional.mse_loss(p(s.movedim(-1, 1)), t.movedim(-1, 1)) for p, s, t in
                                    zip(loss.transfer.projections, hidden(student), hidden(teacher), strict=True)])
        width = student.embed.out_features
        assert [type(p).__name__ for p in loss.transfer.projections] == ["Identity" if width == 32 else "Conv1d"] * 2
        assert found == pytest.approx(float(expected.mean()), abs=1e-6) and (found == 0) == (width == 32)
