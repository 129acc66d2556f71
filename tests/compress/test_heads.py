"""Whole attention heads leave: HeadAttention computes what nn.MultiheadAttention does, and loses the weakest heads."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from autocomp.compress.heads import HeadAttention, attention_layers, drop_heads, head_counts
from autocomp.errors import ConfigError
from autocomp.pipeline import apply
from autocomp.recipe import FineTune, LayerPrune, Prune, Quantize, Recipe
from autocomp.runtime import INT8_KERNELS, fp32_fallbacks
from tests import zoo
from tests.conftest import QUICK_MEASURE
from tests.zoo import post_ln_transformer, pre_ln_transformer


def _inputs(batch_first: bool, b: int = 3, n: int = 5, m: int = 7, e: int = 16, kdim: int = 16):
    g = torch.Generator().manual_seed(0)
    shape = (lambda length, width: (b, length, width)) if batch_first else (lambda length, width: (length, b, width))
    return torch.randn(*shape(n, e), generator=g), torch.randn(*shape(m, kdim), generator=g), torch.randn(
        *shape(m, kdim), generator=g)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim", [16, 12])
def test_it_computes_what_multihead_attention_computes(batch_first, bias, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    same = HeadAttention.from_multihead(mha).eval()
    q, k, v = _inputs(batch_first, kdim=kdim)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    masks = [{}, {"attn_mask": torch.rand(5, 7) > 0.7}, {"attn_mask": torch.randn(12, 5, 7)},
             {"key_padding_mask": padding},
             {"attn_mask": torch.eye(5, 7, dtype=torch.bool), "key_padding_mask": padding}]
    with torch.no_grad():
        for kwargs in masks:
            for average in (True, False):
                want, want_w = mha(q, k, v, average_attn_weights=average, **kwargs)
                got, got_w = same(q, k, v, average_attn_weights=average, **kwargs)
                assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-6)
            assert same(q, k, v, need_weights=False, **kwargs)[1] is None


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("norm_first", [True, False])
def test_a_transformer_layer_runs_the_same_with_it_in_eval_and_training(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    x, padding = torch.randn(3, 6, 16), torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    converted = copy.deepcopy(encoder)
    assert drop_heads(converted, 0.0, head_counts(encoder)) == []  # nothing removed, every module swapped
    assert all(isinstance(converted.get_submodule(n), HeadAttention) for n in attention_layers(converted))
    for mode in (True, False):
        encoder.train(mode), converted.train(mode)
        with torch.no_grad():
            assert torch.allclose(converted(x), encoder(x), atol=1e-5)
            want = encoder(x, src_key_padding_mask=padding)  # eval: PyTorch's nested-tensor fast path
            got = converted(x, src_key_padding_mask=padding)
            assert torch.allclose(got[~padding], want[~padding], atol=1e-5)


def test_the_heads_that_contribute_nothing_go_first_and_the_output_stays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    attention = model[0].self_attn
    with torch.no_grad():  # heads 1 and 3 read nothing and write nothing
        for h in (1, 3):
            rows = slice(4 * h, 4 * h + 4)
            for part in range(3):
                attention.in_proj_weight[16 * part:][rows] = 0.0
            attention.out_proj.weight[:, rows] = 0.0
    x = torch.randn(2, 5, 16)
    before = model.eval()(x)
    assert drop_heads(model, 0.5, head_counts(model)) == ["0.self_attn: 4 -> 2 heads"]
    converted = model[0].self_attn
    assert converted.num_heads == 2 and converted.q_proj.out_features == 8 and converted.out_proj.in_features == 8
    assert torch.allclose(model(x), before, atol=1e-5)
    # counted against the teacher's heads: asking for the same share again removes nothing more
    assert drop_heads(model, 0.5, {"0.self_attn": 4}) == [] and converted.num_heads == 2
    drop_heads(model, 0.9, {"0.self_attn": 4})
    assert converted.num_heads == 1  # at least one head stays


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_a_recipe_removes_heads_and_the_stream_width_and_deploys_on_int8_kernels(norm_first, tmp_path):
    task = (pre_ln_transformer if norm_first else post_ln_transformer)()
    recipe = Recipe(task=task.name, prune=Prune(heads=0.5, layers={"embed": LayerPrune(0.25, "l1")}),
                    quantize=Quantize(activation_bits=8, bits=8, per_channel=True),
                    finetune=FineTune(epochs=4), measure=QUICK_MEASURE)
    result = apply(recipe, task, tmp_path, progress=False)
    for block in result.model.encoder.layers:
        attention = block.self_attn
        assert isinstance(attention, HeadAttention) and attention.num_heads == 2 and attention.head_dim == 8
        assert attention.q_proj.weight.shape == (16, 24) and attention.out_proj.weight.shape == (24, 16)
    assert result.metrics["params"] < sum(p.numel() for p in task.teacher.parameters())
    assert result.metrics["val_accuracy"] > 0.7  # the artifact still classifies (the teacher: 0.935)
    # every projection of the attention, every MLP layer, runs on an int8 kernel of ONNX Runtime, found by its name
    linears = {n: k for n, k in result.layer_kernels.items() if ".self_attn." in n or ".linear" in n}
    assert set(linears) == {f"encoder.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2")}
    assert set(linears.values()) <= INT8_KERNELS and result.fp32_layers == {}, linears
    with pytest.raises(ConfigError, match="has no attention module"):
        apply(dataclasses.replace(recipe, task="resnet"), zoo.resnet(), tmp_path / "r", progress=False)


def test_a_layer_asked_for_int8_that_runs_in_fp32_is_recorded_with_why():
    kernels = {"conv1": "QLinearConv", "fc1": "FusedGemm", "norm": "LayerNormalization"}
    assert fp32_fallbacks(kernels, ["conv1", "fc1"]) == {
        "fc1": "ONNX Runtime computes it with FusedGemm, not an int8 kernel"}


def test_multihead_attention_itself_deploys_on_int8_kernels(tmp_path):
    # ONNX Runtime's symbolic shape inference fails on the exported nn.MultiheadAttention's Reshape: ONNX's own
    # shape inference takes over, and every projection still runs in int8
    task = post_ln_transformer()
    recipe = Recipe(task=task.name, quantize=Quantize(activation_bits=8, bits=8, per_channel=True),
                    finetune=FineTune(epochs=0), measure=QUICK_MEASURE)
    result = apply(recipe, task, tmp_path, progress=False)
    assert isinstance(result.model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    assert result.kernels["QLinearMatMul"] >= 2 * 4  # in_proj, the two attention products, linear1, linear2
    assert result.layer_kernels["encoder.layers.0.self_attn.out_proj"] in INT8_KERNELS
    assert result.fp32_layers == {} and result.metrics["val_accuracy"] > 0.8
