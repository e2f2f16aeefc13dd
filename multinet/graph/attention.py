"""nn.MultiheadAttention as a traceable subgraph, so that its heads become channel groups.

fx treats nn.MultiheadAttention as an opaque leaf, and its packed ``in_proj_weight`` (3·E × E)
holds q, k and v in one tensor, which one union-find of channels cannot split into three coupled
head sets. Before tracing, a copy of the model gets separate ``q_proj``/``k_proj``/``v_proj``
Linear children (the packed weight's thirds); the tracer then records the attention as those
Linears, reshapes to heads, attention and ``out_proj``. Removing a head then removes head_dim
rows of q, k and v and head_dim columns of out_proj; ``num_heads`` becomes a size literal.
Calls with masks, and modules with add_bias_kv, add_zero_attn or kdim/vdim != embed_dim, stay
leaves (their channels fail closed, as before).
"""
from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def supported_module(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.in_proj_weight is not None
            and m.bias_k is None and not m.add_zero_attn)


def prepare(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose supported attention modules hold separate q/k/v projections
    (``model`` itself when it has none)."""
    if not any(supported_module(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if supported_module(m):
            _split_projections(m)
    return model


def _split_projections(m: nn.MultiheadAttention) -> None:
    e = m.embed_dim
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        layer = nn.Linear(e, e, bias=m.in_proj_bias is not None)
        with torch.no_grad():
            layer.weight.copy_(m.in_proj_weight[i * e:(i + 1) * e])
            if m.in_proj_bias is not None:
                layer.bias.copy_(m.in_proj_bias[i * e:(i + 1) * e])
        setattr(m, name, layer.to(m.in_proj_weight))
    out = nn.Linear(e, e, bias=m.out_proj.bias is not None)  # a plain Linear: saved models name only nn layers
    with torch.no_grad():
        out.weight.copy_(m.out_proj.weight)
        if m.out_proj.bias is not None:
            out.bias.copy_(m.out_proj.bias)
    m.out_proj = out.to(m.out_proj.weight)


def bind_call(args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name, or None when it uses what the subgraph does not support."""
    try:
        bound = _SIGNATURE.bind(None, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    call = dict(bound.arguments)
    if call["key_padding_mask"] is not None or call["attn_mask"] is not None or call["is_causal"]:
        return None
    if not isinstance(call["need_weights"], bool) or not isinstance(call["average_attn_weights"], bool):
        return None
    return call


def traced_attention(tracer, m: nn.MultiheadAttention, call: dict):
    """Record the attention on ``tracer`` (proxies in, proxies out): (output, weights or None)."""
    query, key, value = call["query"], call["key"], call["value"]
    if not m.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    heads, head_dim = m.num_heads, m.head_dim

    def split(proj: nn.Linear, x):
        y = tracer.call_module(proj, proj.forward, (x,), {})
        return y.reshape(y.size(0), y.size(1), heads, head_dim).transpose(1, 2)

    q, k, v = split(m.q_proj, query), split(m.k_proj, key), split(m.v_proj, value)
    weights = None
    if call["need_weights"]:
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim)), -1)
        out = torch.matmul(att, v)
        weights = att.mean(1) if call["average_attn_weights"] else att
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(out.size(0), out.size(2), heads * head_dim)
    out = tracer.call_module(m.out_proj, m.out_proj.forward, (out,), {})
    if not m.batch_first:
        out = out.transpose(0, 1)  # the weights are (N, L, S) in both layouts
    if weights is not None:
        tracer.attention_weights.append(weights.node)
    return out, weights
