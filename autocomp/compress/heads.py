"""Whole attention heads leave: ``nn.MultiheadAttention`` rebuilt from Linear layers, then narrowed by heads.

``nn.MultiheadAttention`` ties its inner width to the model width (``embed_dim``): its heads can only shrink
with the residual stream, every head alike. ``HeadAttention`` computes the same function from separate q, k
and v projections of ``num_heads x head_dim`` features and an ``out_proj`` back to the model width, so one
head (its rows of q, k and v, its columns of ``out_proj``) leaves without touching the stream.
``drop_heads`` swaps every ``nn.MultiheadAttention`` of a model for its equivalent and removes that share of
each one's heads, the least important first (L1 norm of the head's weights; at least one head stays).
Feature and attention-map distillation, QAT, export and int8 treat the new Linear layers as any other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class HeadAttention(nn.Module):
    """Multi-head attention with an inner width of its own (``num_heads x head_dim``), called as
    ``nn.MultiheadAttention`` is: (query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal) -> (output, attention weights or None)."""

    in_proj_weight = in_proj_bias = None  # not nn.MultiheadAttention: PyTorch's fused fast paths stay off
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> HeadAttention:
        """The same function as ``mha`` (its weights copied)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, kdim=mha.kdim, vdim=mha.vdim, bias=bias,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.load_state_dict(mha.out_proj.state_dict())
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (b, n, _), m = query.shape, key.shape[1]
        q, k, v = (proj(t).reshape(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
                   for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (b, heads, n, m)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:  # (n, m), or (b x heads, n, m)
            shape = (1, 1, n, m) if attn_mask.dim() == 2 else (b, self.num_heads, n, m)
            scores = scores + _additive(attn_mask, scores.dtype).reshape(shape)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).reshape(b, 1, 1, m)
        weights = nn.functional.dropout(scores.softmax(-1), self.dropout, self.training)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def keep_heads(self, heads: list[int]) -> None:
        """Keep only the ``heads`` (indices), in place."""
        rows = torch.tensor([h * self.head_dim + i for h in heads for i in range(self.head_dim)])
        with torch.no_grad():
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                _narrow(proj, rows, out=True)
            _narrow(self.out_proj, rows, out=False)
        self.num_heads = len(heads)

    def head_importance(self) -> Tensor:
        """(num_heads,) L1 norm of each head's weights: its rows of q, k and v and its columns of ``out_proj``."""
        per_row = sum(p.weight.abs().sum(1) for p in (self.q_proj, self.k_proj, self.v_proj))
        per_row = per_row + self.out_proj.weight.abs().sum(0)
        return per_row.detach().reshape(self.num_heads, self.head_dim).sum(1)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: not attended) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _narrow(layer: nn.Linear, idxs: Tensor, out: bool) -> None:
    """Keep the output features (``out``) or the input features ``idxs`` of ``layer``."""
    if out:
        layer.weight = nn.Parameter(layer.weight[idxs].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[idxs].clone())
        layer.out_features = len(idxs)
    else:
        layer.weight = nn.Parameter(layer.weight[:, idxs].clone())
        layer.in_features = len(idxs)


def attention_layers(model: nn.Module) -> list[str]:
    """The names of the model's attention modules whose heads can leave (``nn.MultiheadAttention`` or already
    ``HeadAttention``)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, HeadAttention))
            and not (isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn))]


def heads_to_remove(heads: int, share: float) -> int:
    """How many of ``heads`` a ``share`` removes: the nearest count, at least one head kept."""
    return min(round(share * heads), heads - 1)


def drop_heads(model: nn.Module, share: float, original: dict[str, int]) -> list[str]:
    """Swap each attention module of ``model`` for a ``HeadAttention`` and remove its least important heads
    until ``share`` of its ``original`` head count is gone (counted against the teacher's, so an iterative
    schedule may call this once per round); return one line per module that lost heads."""
    done = []
    for name in attention_layers(model):
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            module = HeadAttention.from_multihead(module)
            _set_submodule(model, name, module)
        total = original.get(name, module.num_heads)
        need = heads_to_remove(total, share) - (total - module.num_heads)  # earlier rounds removed the rest
        if need <= 0:
            continue
        keep = module.head_importance().argsort(descending=True)[: module.num_heads - need].sort().values
        module.keep_heads(keep.tolist())
        done.append(f"{name}: {module.num_heads + need} -> {module.num_heads} heads")
    for encoder in (m for m in model.modules() if isinstance(m, nn.TransformerEncoder)):
        encoder.use_nested_tensor = False  # its nested-tensor fast path reads nn.MultiheadAttention's fused weights
    return done


def head_counts(model: nn.Module) -> dict[str, int]:
    """Each attention module's head count."""
    return {name: model.get_submodule(name).num_heads for name in attention_layers(model)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
