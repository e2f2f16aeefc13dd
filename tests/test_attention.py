"""Attention heads as channel groups: SDPA and explicit softmax(QKᵀ)V, grouped-query attention,
nn.MultiheadAttention (torchvision ViT style, with a class token)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from group_checks import check_model, randomize_norm_stats


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with separate q/k/v projections and literal head counts."""

    def __init__(self, d=16, heads=4, kv_heads=4, form="sdpa"):
        super().__init__()
        self.h, self.kv, self.hd, self.form = heads, kv_heads, d // heads, form
        self.embed = nn.Linear(6, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, heads * self.hd)
        self.k, self.v = nn.Linear(d, kv_heads * self.hd), nn.Linear(d, kv_heads * self.hd)
        self.o = nn.Linear(heads * self.hd, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        h = self.embed(x)
        y = self.norm1(h)
        q = self.q(y).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.h != self.kv)
        else:
            r = self.h // self.kv
            if r > 1:
                k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
            a = torch.softmax(q @ k.transpose(-2, -1) * self.hd ** -0.5, dim=-1) @ v
        h = h + self.o(a.transpose(1, 2).reshape(b, t, self.h * self.hd))
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return self.head(h)


def _group(graph, producer):
    g = graph.group_of_layer(producer)
    assert g is not None, f"no group produced by {producer}"
    return g


@pytest.mark.parametrize("form", ["sdpa", "explicit"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_heads_are_channel_groups(form, kv_heads):
    torch.manual_seed(0)
    model = randomize_norm_stats(AttentionBlock(kv_heads=kv_heads, form=form))
    graph = check_model(model, torch.randn(2, 5, 6))
    heads = _group(graph, "q")
    r = 4 // kv_heads
    # a channel is one k/v head with its r q heads: head_dim*r features of q and o, head_dim of k and v
    assert heads.prunable and heads.exact and heads.size == kv_heads and heads.unit == 4 * r
    assert set(heads.producers) == {"q", "k", "v"}
    (slot,) = heads.consumers
    assert slot.consumer == "o" and slot.block == 4 * r and slot.positions.tolist() == [4 * r * i for i in range(kv_heads)]
    assert _group(graph, "up").prunable  # FFN hidden neurons still prunable
    stream = _group(graph, "embed")
    assert stream.prunable and not stream.exact  # LayerNorm statistics


@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_removing_a_head_equals_zeroing_its_output_before_the_projection(form):
    torch.manual_seed(0)
    model = AttentionBlock(form=form).eval()
    x = torch.randn(2, 5, 6)
    graph = multinet.trace(model, x)
    heads = _group(graph, "q")
    pruned = multinet.prune(graph, {heads.id: [0, 2, 3]})
    assert pruned.q.out_features == 12 and pruned.k.out_features == 12 and pruned.o.in_features == 12
    with torch.no_grad():
        model.o.weight[:, 4:8] = 0
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    # the head count is a literal in view(b, t, 4, 4): surgery rewrote it
    assert any(n.args[3:4] == (3,) for n in pruned.graph.nodes if n.target == "view")


def test_keep_all_heads_is_exact():
    torch.manual_seed(0)
    model = AttentionBlock(kv_heads=2).eval()
    x = torch.randn(2, 5, 6)
    graph = multinet.trace(model, x)
    full = multinet.prune(graph, {g.id: list(range(g.size)) for g in graph.prunable_groups})
    assert torch.equal(full(x), graph.module(x))


class PackedQKV(nn.Module):
    """One Linear for q, k and v, chunked: the three thirds cannot be tied head by head."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = q.view(2, 3, 2, 4).transpose(1, 2), k.view(2, 3, 2, 4).transpose(1, 2), v.view(2, 3, 2, 4).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


def test_packed_qkv_fails_closed_with_reason():
    graph = multinet.trace(PackedQKV(), torch.randn(2, 3, 8))
    g = _group(graph, "qkv")
    assert not g.prunable and "permuted order" in " ".join(g.reasons)


class ViTBlock(nn.Module):
    """torchvision's ViT encoder: class token, position embedding, nn.MultiheadAttention."""

    def __init__(self, d=16, heads=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 3)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln_1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        a, _ = self.self_attention(y, y, y, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_block_multihead_attention_heads(batch_first):
    torch.manual_seed(0)
    model = randomize_norm_stats(ViTBlock(batch_first=batch_first))
    x = torch.randn(2, 3, 8, 8)
    graph = check_model(model, x)
    torch.testing.assert_close(graph.module(x), model(x), rtol=1e-5, atol=1e-6)
    heads = _group(graph, "self_attention.q_proj")
    assert heads.prunable and heads.size == 4 and heads.unit == 4
    assert set(heads.producers) == {"self_attention.q_proj", "self_attention.k_proj", "self_attention.v_proj"}
    stream = _group(graph, "patch")
    assert stream.prunable and {"class_token", "pos"} <= set(stream.passthrough)
    pruned = multinet.prune(graph, {heads.id: [1, 3], stream.id: list(range(0, 16, 2))})
    assert pruned.class_token.shape == (1, 1, 8) and pruned.self_attention.out_proj.in_features == 8
    assert pruned(x).shape == (2, 3)


class MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, mask):
        h = self.embed(x)
        return self.attn(h, h, h, key_padding_mask=mask)[0].sum(-1)


def test_multihead_attention_with_a_mask_stays_a_leaf():
    graph = multinet.trace(MaskedAttention(), (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)))
    g = _group(graph, "embed")
    assert not g.prunable and "MultiheadAttention" in g.reasons[0]


class AveragedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, weights = self.attn(*(self.embed(x),) * 3)
        return self.head(out), weights


def test_used_attention_weights_keep_heads_whole():
    graph = multinet.trace(AveragedWeights(), torch.randn(2, 3, 4))
    heads = _group(graph, "attn.q_proj")
    assert not heads.prunable and "reduction over the channel dim" in heads.reasons[0]
