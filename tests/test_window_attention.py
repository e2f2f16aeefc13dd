"""Swin-style shifted-window attention and packed q/k/v indexed after the head reshape.

The window attention below is written as torchvision writes Swin's: one function that fx records
as a single opaque call (``torch.fx.wrap``), padding, a cyclic shift, windows by view/permute, a
packed qkv projection reshaped to (3, heads, head_dim) and indexed, a per-head relative position
bias table, and a shifted-window mask built in place on ``new_zeros``. ``multinet.trace`` falls
back to torch.export for it, where the heads become channel groups.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from group_checks import check_model, randomize_norm_stats


def window_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, index, heads: int, window: int, shift: int):
    """(B, H, W, C) -> (B, H, W, C): attention inside window x window patches of a shifted grid."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, (window - W % window) % window, 0, (window - H % window) % window))
    Hp, Wp = x.shape[1], x.shape[2]
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    rows, cols = Hp // window, Wp // window
    n = window * window
    x = x.view(B, rows, window, cols, window, C).permute(0, 1, 3, 2, 4, 5).reshape(B * rows * cols, n, C)
    qkv = F.linear(x, qkv_w, qkv_b).reshape(x.size(0), n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    if shift:  # positions that came from different sides of the cyclic shift do not attend to each other
        region = x.new_zeros((Hp, Wp))
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        label = 0
        for hs in cuts:
            for ws in cuts:
                region[hs, ws] = label
                label += 1
        region = region.view(rows, window, cols, window).permute(0, 2, 1, 3).reshape(rows * cols, n)
        mask = (region.unsqueeze(1) - region.unsqueeze(2)) != 0
        mask = mask.float().masked_fill(mask, -100.0)
        scores = scores.view(B, rows * cols, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, n, n)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.size(0), n, C)
    out = F.linear(out, proj_w, proj_b)
    out = out.view(B, rows, cols, window, window, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


torch.fx.wrap("window_attention")  # as torchvision does for Swin: fx records one opaque call


def relative_index(window: int) -> torch.Tensor:
    """For every (query, key) pair of a window, its row in a (2w-1)^2 table of relative offsets."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])  # 2 x n
    rel = pos[:, :, None] - pos[:, None, :] + window - 1
    return (rel[0] * (2 * window - 1) + rel[1]).flatten()


class WindowBlock(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, window: int = 2, shift: int = 1):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.embed, self.norm = nn.Linear(3, dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", relative_index(window))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):  # (B, H, W, 3)
        h = self.embed(x)
        h = h + window_attention(self.norm(h), self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
                                 self.table, self.index, self.heads, self.window, self.shift)
        return self.head(h.mean((1, 2)))


def _group(graph, producer):
    g = graph.group_of_layer(producer)
    assert g is not None, f"no group produced by {producer}"
    return g


@pytest.mark.parametrize("shift", [0, 1])
def test_wrapped_window_attention_is_captured_with_export_and_its_heads_prunable(shift):
    torch.manual_seed(0)
    model = randomize_norm_stats(WindowBlock(shift=shift))
    x = torch.randn(2, 3, 3, 3)  # 3x3 is padded to 4x4: four 2x2 windows
    with pytest.warns(UserWarning, match="window_attention .*opaque calls; captured with torch.export"):
        graph = multinet.trace(model, x)
    heads = _group(graph, "qkv")
    assert heads.prunable and heads.exact and heads.attention_heads and heads.size == 2 and heads.unit == 4
    assert heads.consumer_names == ["proj"] and "table" in heads.passthrough
    assert _group(graph, "embed").prunable  # the stream through pad, roll and the windows
    pruned = multinet.prune(graph, {heads.id: [1]})
    assert pruned.qkv.out_features == 12 and pruned.proj.in_features == 4 and pruned.table.shape == (9, 1)
    with torch.no_grad():
        model.proj.weight[:, :4] = 0  # head 0's output, zeroed before the projection
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_model(model, x)  # keep-all exactness, every group's zeroed channel == pruned channel


def test_pruned_window_attention_saves_without_in_place_ops(tmp_path):
    """The shifted-window mask (new_zeros, fill_ of slices, masked_fill) is folded into a buffer at
    capture, so the graph holds only pure tensor functions and a model file takes it."""
    torch.manual_seed(0)
    model, x = WindowBlock(shift=1).eval(), torch.randn(2, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = multinet.trace(model, x)
    assert not any("fill_" in str(n.target) or "new_zeros" in str(n.target) for n in graph.module.graph.nodes)
    assert not any("lifted_tensor" in name for name, _ in graph.module.named_buffers())
    pruned = multinet.prune(graph, {graph.group_of_layer("qkv").id: [1]})
    multinet.save(pruned, tmp_path / "window.mnet", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(multinet.load(tmp_path / "window.mnet")(x), pruned(x))
        torch.testing.assert_close(graph.module(x), model(x), rtol=1e-5, atol=1e-6)  # the folded mask is the same


def test_fx_capture_keeps_the_wrapped_attention_opaque_with_the_reason():
    graph = multinet.trace(WindowBlock().eval(), torch.randn(2, 3, 3, 3), capture="fx")
    stream = _group(graph, "embed")
    assert not stream.prunable and any("window_attention" in r for r in stream.reasons)


class IndexedQKV(nn.Module):
    """timm's ViT attention: packed qkv reshaped to (B, N, 3, heads, head_dim), then unbound or indexed."""

    def __init__(self, dim: int = 8, heads: int = 2, form: str = "unbind"):
        super().__init__()
        self.heads, self.form = heads, form
        self.embed, self.qkv, self.proj, self.head = nn.Linear(5, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        B, N, C = h.shape
        qkv = self.qkv(h).reshape(B, N, 3, self.heads, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.form == "unbind" else (qkv[0], qkv[1], qkv[2])
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 4 * self.heads)
        return self.head(h + self.proj(a))


@pytest.mark.parametrize("form", ["unbind", "index"])
def test_packed_qkv_indexed_after_the_head_reshape_gives_head_groups_under_fx(form):
    torch.manual_seed(0)
    model = IndexedQKV(form=form).eval()
    x = torch.randn(2, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx reads it whole: no fallback to torch.export
        graph = check_model(model, x)
    heads = _group(graph, "qkv")
    assert heads.prunable and heads.attention_heads and heads.size == 2 and heads.consumer_names == ["proj"]
    pruned = multinet.prune(graph, {heads.id: [0]})
    # q, k and v each keep head 0: rows 0:4, 8:12 and 16:20 of the packed weight
    assert torch.equal(pruned.qkv.weight, model.qkv.weight[[*range(0, 4), *range(8, 12), *range(16, 20)]])


class RollChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, -1))


def test_roll_along_the_channel_dim_fails_closed():
    graph = multinet.trace(RollChannels(), torch.randn(2, 4), capture="fx")
    group = _group(graph, "a")
    assert not group.prunable and "roll along the channel dim" in " ".join(group.reasons)


def cosine_window_attention(x, qkv_w, qkv_b, proj_w, proj_b, logit_scale, bias, heads: int):
    """Swin V2's form on (windows, n, C): the k third of the qkv bias zeroed in place on a copy,
    cosine attention scaled per head by a clamped, exponentiated logit scale, and an additive
    per-head bias."""
    windows, n, C = x.shape
    qkv_b = qkv_b.clone()
    qkv_b[C:2 * C].zero_()
    qkv = F.linear(x, qkv_w, qkv_b).reshape(windows, n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp() + 16 * torch.sigmoid(bias)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(windows, n, C)
    return F.linear(out, proj_w, proj_b)


torch.fx.wrap("cosine_window_attention")


class CosineWindowBlock(nn.Module):
    """Tokens already in windows (windows, n, 3); the per-head bias table is an MLP's output over
    relative offsets, gathered by index (Swin V2's continuous position bias)."""

    def __init__(self, dim: int = 8, heads: int = 2, window: int = 2):
        super().__init__()
        self.heads, self.n = heads, window * window
        self.embed, self.norm = nn.Linear(3, dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))
        self.cpb = nn.Sequential(nn.Linear(2, 16), nn.ReLU(inplace=True), nn.Linear(16, heads, bias=False))
        offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
        self.register_buffer("coords", torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1))
        self.register_buffer("index", relative_index(window))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.embed(x)
        table = self.cpb(self.coords).view(-1, self.heads)
        bias = table[self.index].view(self.n, self.n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        h = h + self.norm(cosine_window_attention(h, self.qkv.weight, self.qkv.bias, self.proj.weight,
                                                  self.proj.bias, self.logit_scale, bias, self.heads))
        return self.head(h.mean(1))


def test_swin_v2_style_attention_heads_include_the_bias_mlp_and_logit_scale(tmp_path):
    torch.manual_seed(0)
    model = randomize_norm_stats(CosineWindowBlock())
    x = torch.randn(3, 4, 3)
    with pytest.warns(UserWarning, match="cosine_window_attention .*captured with torch.export"):
        graph = multinet.trace(model, x)
    heads = _group(graph, "qkv")
    assert heads.prunable and heads.attention_heads and heads.size == 2 and heads.consumer_names == ["proj"]
    assert set(heads.producers) == {"qkv", "cpb.2"} and "logit_scale" in heads.passthrough
    # the copied-and-patched bias became the layer's own parameter: k's third is zero in it
    assert torch.equal(graph.module.qkv.bias[8:16], torch.zeros(8)) and torch.equal(graph.module.qkv.bias[:8], model.qkv.bias[:8])
    pruned = multinet.prune(graph, {heads.id: [1]})
    assert pruned.logit_scale.shape == (1, 1, 1) and pruned.get_submodule("cpb.2").out_features == 1 and pruned.proj.in_features == 4
    with torch.no_grad():
        model.proj.weight[:, :4] = 0
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    multinet.save(pruned, tmp_path / "v2.mnet", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(multinet.load(tmp_path / "v2.mnet")(x), pruned(x))
