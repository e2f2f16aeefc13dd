"""Hand-written architectures with the structures peers get wrong (see RELATED_WORK.md)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from group_checks import check_model, randomize_norm_stats


def _group(graph, producer):
    g = graph.group_of_layer(producer)
    assert g is not None, f"no group produced by {producer}"
    return g


class ConcatOffsets(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 3, padding=1)
        self.mix = nn.Conv2d(15, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(15)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)
        return self.mix(F.relu(self.bn(y)))


def test_concat_offsets_and_batchnorm_over_concat():
    graph = check_model(randomize_norm_stats(ConcatOffsets()), torch.randn(2, 3, 6, 6))
    assert [_group(graph, n).consumers[0].positions.tolist() for n in "abc"] == [
        [0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert _group(graph, "b").passthrough == ["bn"]


class SplitChunkSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(12, 5, 1)
        self.tail = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        a, b = torch.split(s, [4, 8], dim=1)
        c, d = s.chunk(2, dim=1)
        y = torch.cat([self.left(a), self.right(b), c[:, 2:6]], 1)
        return self.head(y) + self.tail(d).sum(1, keepdim=True)


def test_split_chunk_and_slice_rewrite_sizes():
    graph = check_model(SplitChunkSlice(), torch.randn(2, 3, 5, 5))
    stem = _group(graph, "stem")
    assert stem.prunable and stem.size == 12
    # uneven pruning of the two halves must rewrite chunk into explicit split sizes
    pruned = multinet.prune(graph, {stem.id: [0, 1, 4, 5, 6, 7, 8, 11]})
    assert pruned(torch.randn(1, 3, 5, 5)).shape == (1, 5, 5, 5)


class ViewLiteral(nn.Module):
    """LeNet-style x.view(-1, C*H*W) with a literal, and an unflatten back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.conv2 = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 2)
        flat = y.view(-1, 6 * 4 * 4)
        back = flat.reshape(flat.shape[0], 6, 4, 4)
        return self.fc(flat), self.conv2(back)


def test_view_with_literal_channel_count():
    graph = check_model(ViewLiteral(), torch.randn(2, 1, 8, 8))
    g = _group(graph, "conv")
    assert {(s.consumer, s.block) for s in g.consumers} == {("fc", 16), ("conv2", 1)}


class DepthwiseMultiplier(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(12)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.out(F.relu6(self.bn(self.dw(self.pw(x)))))


def test_depthwise_with_channel_multiplier():
    graph = check_model(randomize_norm_stats(DepthwiseMultiplier()), torch.randn(2, 3, 5, 5))
    g = _group(graph, "pw")
    (slot,) = g.consumers
    assert slot.consumer == "out" and slot.block == 2
    pruned = multinet.prune(graph, {g.id: [0, 2, 5]})
    assert pruned.dw.groups == 3 and pruned.dw.out_channels == 6 and pruned.out.in_channels == 6


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.g(self.a(x)))


def test_grouped_conv_keeps_equal_channels_per_group():
    graph = check_model(Grouped(), torch.randn(2, 3, 5, 5))
    for name in ("a", "g"):
        g = _group(graph, name)
        assert g.prunable and [b.tolist() for b in g.balanced[0]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = _group(graph, "a")
    with pytest.raises(multinet.PruneError, match="same number of channels"):
        multinet.prune(graph, {a.id: [0, 1, 2, 4]})
    pruned = multinet.prune(graph, {a.id: [0, 3, 5, 6]})
    assert pruned.g.groups == 2 and pruned.g.in_channels == 4 and pruned.g.weight.shape == (8, 2, 3, 3)


class GroupedOverConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.g(torch.cat([self.a(x), self.b(x)], 1)).sum(1)


def test_grouped_conv_over_several_channel_groups_fails_closed():
    graph = multinet.trace(GroupedOverConcat(), torch.randn(2, 3, 5, 5))
    for name in ("a", "b"):
        g = _group(graph, name)
        assert not g.prunable and "span several channel groups" in g.reasons[0]


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(self.b(y))


def test_channel_shuffle_fails_closed():
    graph = check_model(ChannelShuffle(), torch.randn(2, 3, 4, 4))
    g = _group(graph, "a")
    assert not g.prunable and "reshape" in g.reasons[0]
    assert not g.attention_heads  # channels made coarser by the shuffle's reshape are not attention heads
    assert _group(graph, "b").prunable  # the damage stays local


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channel-last LayerNorm and FFN, layer scale, residual."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.head = nn.Conv2d(dim, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return self.head(x + self.gamma * y)


def test_convnext_block_channel_last_and_layer_scale():
    graph = check_model(randomize_norm_stats(ConvNeXtBlock()), torch.randn(2, 3, 5, 5))
    hidden = _group(graph, "fc1")
    assert hidden.prunable and hidden.exact and hidden.consumer_names == ["fc2"]
    stream = _group(graph, "stem")
    assert set(stream.producers) == {"stem", "fc2"} and {"gamma", "dw", "norm"} <= set(stream.passthrough)
    assert stream.prunable and not stream.exact  # LayerNorm statistics shift
    pruned = multinet.prune(graph, {stream.id: [0, 3, 4, 7]})
    assert pruned.gamma.shape == (4, 1, 1) and pruned.norm.normalized_shape == (4,)


class FunctionalLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(5, 6 * 2 * 2))
        self.ln_w = nn.Parameter(torch.rand(6) + 0.5)
        self.register_buffer("shift", torch.randn(1, 6, 1, 1))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1) - self.shift)
        y = F.adaptive_avg_pool2d(y, 2)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (6,), self.ln_w).permute(0, 3, 1, 2)
        return F.linear(y.flatten(1), self.w2)


def test_functional_conv_linear_and_parameters():
    graph = check_model(FunctionalLayers(), torch.randn(2, 3, 4, 4))
    g = _group(graph, "w1")
    assert g.prunable and {"shift", "ln_w"} <= set(g.passthrough)
    pruned = multinet.prune(graph, {g.id: [1, 2, 5]})
    assert pruned.w1.shape == (3, 3, 3, 3) and pruned.w2.shape == (5, 12) and pruned.shift.shape == (1, 3, 1, 1)


class SharedConv(nn.Module):
    """One conv applied twice (siamese): both calls must agree on channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.shared(F.relu(self.shared(self.a(x)))))


def test_module_called_twice():
    graph = check_model(SharedConv(), torch.randn(2, 3, 4, 4))
    g = _group(graph, "a")
    assert set(g.producers) == {"a", "shared"}  # the second call's input is the shared conv's output


class Transformerish(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 16), nn.Linear(16, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h)[0]
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h)


def test_multihead_attention_heads_stream_and_ffn_prunable():
    graph = check_model(randomize_norm_stats(Transformerish()), torch.randn(2, 4, 5))
    stream = _group(graph, "embed")
    assert stream.prunable and "attn.out_proj" in stream.producers
    heads = _group(graph, "attn.q_proj")
    assert heads.prunable and heads.size == 2 and heads.consumers[0].block == 4
    assert _group(graph, "up").prunable


class Untracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        y = x + self.a(x)  # residual from the model input
        z = torch.cat([x, self.b(y)], 1)  # the input's part of the concat is not prunable
        return self.c(torch.cumsum(z, 1))


def test_input_residual_and_unknown_op_fail_closed():
    graph = multinet.trace(Untracked(), torch.randn(2, 3, 4, 4))
    a = _group(graph, "a")
    assert not a.prunable and "untracked" in a.reasons[0]
    b = _group(graph, "b")
    assert not b.prunable and "cumsum" in b.reasons[0]


class GatingAndScalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.gate = nn.Linear(6, 6)
        self.gn = nn.GroupNorm(6, 6)
        self.gn2 = nn.GroupNorm(2, 6)
        self.b = nn.Conv2d(6, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.gn(self.a(x)) * 0.5 + 1.0
        s = torch.sigmoid(self.gate(y.mean((2, 3))))
        y = y * s[:, :, None, None]
        return self.out(self.gn2(self.b(y)))


def test_gating_scalars_and_groupnorm():
    # `* 0.5 + 1.0` turns a zeroed channel into ones, so only the consumer-side check applies
    graph = check_model(randomize_norm_stats(GatingAndScalars()), torch.randn(2, 3, 4, 4), producer_side=False)
    a = _group(graph, "a")
    assert a.prunable and set(a.producers) == {"a", "gate"} and "gn" in a.passthrough
    b = _group(graph, "b")
    assert not b.prunable and "GroupNorm with 2 groups" in b.reasons[0]


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return {"logits": self.b(h), "features": h.sum(1)}


def test_reduction_over_channels_fails_closed():
    graph = check_model(DictOutput(), torch.randn(3, 4))
    g = _group(graph, "a")
    assert not g.prunable and "reduction over the channel dim" in g.reasons[0]


@pytest.mark.parametrize("model_cls", [ConcatOffsets, SplitChunkSlice, DepthwiseMultiplier, ConvNeXtBlock])
def test_prune_accepts_module_and_example_inputs(model_cls):
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(2, 3, 5, 5)
    graph = multinet.trace(model, x)
    g = graph.prunable_groups[0]
    pruned = multinet.prune(model, {g.id: list(range(0, g.size, 2))}, example_inputs=x)
    assert multinet.count(pruned, (x,)).flops < multinet.count(graph.module).flops


class CatOfComputedList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.cat(self.a(x).chunk(2, 1)[::-1], 1))


def test_cat_of_computed_list_fails_closed():
    graph = multinet.trace(CatOfComputedList(), torch.randn(1, 3, 2, 2))
    group = _group(graph, "a")
    assert not group.prunable and "tuple" in group.reasons[0]


class ConcatIntoResidual(nn.Module):
    """A wide stream added to a concat of two narrow producers, and one tensor concatenated twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.c(x) + torch.cat([self.a(x), self.b(x)], 1)
        return self.mix(torch.cat([y, F.relu(y)], 1))


def test_concat_added_to_stream_and_repeated_concat():
    graph = check_model(ConcatIntoResidual(), torch.randn(2, 3, 3, 3))
    g = _group(graph, "c")
    assert g.size == 8 and set(g.producers) == {"a", "b", "c"}
    (pa,) = [off for sid, off in g.members if graph.analysis.table.spaces[sid].owner == "b"]
    assert pa == 3
    slots = [s for s in g.consumers if s.consumer == "mix"]
    assert sorted(s.positions[0].item() for s in slots) == [0, 8]
    pruned = multinet.prune(graph, {g.id: [1, 4, 6]})
    assert pruned.a.out_channels == 1 and pruned.b.out_channels == 2 and pruned.mix.in_channels == 6


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.dw = nn.Conv1d(6, 6, 5, padding=2, groups=6)
        self.c2 = nn.Conv1d(6, 4, 1)
        self.fc = nn.Linear(4 * 3, 2)

    def forward(self, x):
        y = self.dw(F.relu(self.bn(self.c1(x))))
        return self.fc(F.adaptive_avg_pool1d(self.c2(y), 3).flatten(1))


def test_conv1d_sequence_model():
    graph = check_model(randomize_norm_stats(Conv1dNet()), torch.randn(2, 2, 9))
    assert _group(graph, "c1").passthrough == ["bn", "dw"]
    assert _group(graph, "c2").consumers[0].block == 3


def test_column_blocks_match_unfolded_weights():
    """Zeroing a channel's column block in weight.flatten(1) equals zeroing its input channel."""
    torch.manual_seed(0)
    graph = multinet.trace(ViewLiteral(), torch.randn(2, 1, 8, 8))
    g = _group(graph, "conv")
    for slot in g.consumers:
        layer = graph.module.get_submodule(slot.consumer)
        cols = slot.column_blocks()
        assert cols.shape == (6, slot.block * slot.columns_per_position)
        weight = layer.weight.detach().flatten(1)
        channel = 4
        expected = weight.clone()
        if slot.kind == "linear":
            expected[:, 4 * 16:5 * 16] = 0
        else:
            expected.view(layer.out_channels, 6, -1)[:, channel] = 0
        got = weight.clone()
        got[:, cols[channel]] = 0
        assert torch.equal(got, expected)


class SizeFromAnotherTensor(nn.Module):
    """maxvit-style: a channel count read off one tensor shapes another (attention output)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.qkv = nn.Linear(6, 18)
        self.b = nn.Linear(6, 2)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        n, t, d = h.shape
        q = self.qkv(h)[..., :6]
        mixed = torch.cumsum(q, 1).reshape(n, t, d)  # d comes from h, the data from q
        own = h.reshape(n * t, h.size(-1))  # a count used on its own tensor is fine
        return self.b(mixed) + self.c(own).sum(-1, keepdim=True)[:, :1].reshape(n, t, 1)


def test_channel_count_used_to_shape_another_tensor_fails_closed():
    # fx keeps `d` as a size read off h (torch.export, which auto mode would fall back to here,
    # bakes it into a literal that follows q's own channels, and the group is prunable there)
    graph = multinet.trace(SizeFromAnotherTensor(), torch.randn(2, 3, 4), capture="fx")
    group = _group(graph, "a")
    assert not group.prunable and "channel count shapes another tensor" in " ".join(group.reasons)


class TwoLinears(nn.Module):
    """a: 4 -> 6 channels, b: 6 -> 2; subclasses say what happens to a's channels in between."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)


class SizeOnOwnTensor(TwoLinears):
    def forward(self, x):
        h = self.a(x)
        return self.b(h.reshape(-1, h.size(-1)))


def test_channel_count_used_on_its_own_tensor_is_fine():
    graph = check_model(SizeOnOwnTensor(), torch.randn(2, 3, 4))
    assert _group(graph, "a").prunable


class TokensAsRows(TwoLinears):
    """The output has a row per token, not per sample (a (B, T, C) tensor reshaped to (B*T, C))."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).reshape(-1, 6))


class TokensMixed(TwoLinears):
    """Rows ordered token-major: a sample's rows are not together, so no subset of rows is a subset of samples."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).transpose(0, 1).reshape(-1, 6))


@pytest.mark.parametrize("model_cls, per_sample", [(TokensAsRows, True), (TokensMixed, False)])
@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_a_budget_on_outputs_with_several_rows_per_sample(model_cls, per_sample, mode):
    """The auto schedule measures errors on some samples at a time: it finds how many rows each sample
    has, and where an output's rows mix samples it measures on every sample at once (this crashed with a
    size mismatch before). The plan's error is measured against the right rows either way."""
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(48, 3, 4)
    result = multinet.compress(model, x, batch_size=16, budget=multinet.Budget(flops=0.6), mode=mode)
    assert result.flops_after <= 0.6 * result.flops_before + 1e-9
    with torch.no_grad():
        expected = float(((result.model(x) - model(x)) ** 2).sum() / (model(x) ** 2).sum())
    assert result.plan.measured_error == pytest.approx(expected, rel=1e-4, abs=1e-12)
    graph = multinet.trace(model, x[:1])
    from multinet.schedule import prepare
    ctx = prepare(graph, x, multinet.Budget(flops=0.6), batch_size=16)
    assert ctx.masked.per_sample is per_sample


class PackedGatedMLP(nn.Module):
    """Phi-3's MLP: one Linear gives gate and up, chunked in two and multiplied (a GLU)."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(6, 2 * 5), nn.Linear(5, 3)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def test_packed_gate_and_up_are_one_group_cut_in_two_parts():
    torch.manual_seed(0)
    model = PackedGatedMLP().eval()
    x = torch.randn(4, 6)
    graph = check_model(model, x)  # zeroed channel == pruned channel, keep-all exact
    group = _group(graph, "gate_up")
    assert group.prunable and group.size == 5 and group.consumer_names == ["down"]
    pruned = multinet.prune(graph, {group.id: [0, 2, 3, 4]})
    # channel 1 is row 1 (gate) and row 6 (up) of the packed weight
    assert torch.equal(pruned.gate_up.weight, model.gate_up.weight[[0, 2, 3, 4, 5, 7, 8, 9]])


class ChannelMeanAsFeature(TwoLinears):
    """A mean over the channels used as a feature of its own, not to rescale what it was taken of."""

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h.mean(-1, keepdim=True)


def test_a_channel_mean_that_does_not_normalise_fails_closed():
    graph = multinet.trace(ChannelMeanAsFeature(), torch.randn(3, 4))
    group = _group(graph, "a")
    assert not group.prunable and "reduction over the channel dim" in " ".join(group.reasons)


class FPNDetector(nn.Module):
    """A detector's feature pyramid as torchvision writes it: lateral 1x1s, a top-down path upsampled to
    the lateral's spatial size read from its shape (``F.interpolate(size=lateral.shape[-2:])``), 3x3
    smoothing, and one head shared by every level, whose class and box outputs stay whole."""

    def __init__(self, w: int = 4):
        super().__init__()
        self.c2 = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.c4 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.l2, self.l3, self.l4 = nn.Conv2d(w, 6, 1), nn.Conv2d(2 * w, 6, 1), nn.Conv2d(4 * w, 6, 1)
        self.s2, self.s3 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.ReLU())
        self.cls, self.box = nn.Conv2d(5, 3, 1), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        c2 = self.c2(x)
        c3 = self.c3(c2)
        p4 = self.l4(self.c4(c3))
        lateral3 = self.l3(c3)
        p3 = self.s3(lateral3 + F.interpolate(p4, size=lateral3.shape[-2:], mode="nearest"))
        lateral2 = self.l2(c2)
        p2 = self.s2(lateral2 + F.interpolate(p3, size=c2.shape[-2:], mode="nearest"))
        return [(self.cls(self.head(p)), self.box(self.head(p))) for p in (p2, p3, p4)]


def test_fpn_detector_upsampled_to_a_shape_read_off_a_tensor():
    graph = check_model(randomize_norm_stats(FPNDetector()), torch.randn(2, 3, 16, 16))
    # reading only the spatial dims of a shape leaves the channels free: the backbone stays prunable
    for layer in ("c2.0", "c3.0", "c4.0", "head.0"):
        assert _group(graph, layer).prunable, (layer, _group(graph, layer).reasons)
    # the laterals, the smoothing convs and what the top-down path adds them to are one channel group
    assert set(_group(graph, "l4").producers) == {"l2", "l3", "l4", "s2", "s3"}
    assert not _group(graph, "cls").prunable and not _group(graph, "box").prunable


class ShapeWithChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.reshape(y.shape[0], -1)) + torch.zeros(y.shape[1:]).sum()


def test_a_shape_slice_that_holds_the_channel_count_fails_closed():
    graph = multinet.trace(ShapeWithChannels(), torch.randn(2, 3, 5, 5))
    group = _group(graph, "conv")
    assert not group.prunable and any("sliced" in r for r in group.reasons)


class SegmentationUNet(nn.Module):
    """An encoder-decoder: a transposed conv and bilinear upsampling bring the decoder back up, and
    concatenated skips join the encoder's features."""

    def __init__(self, w: int = 4):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.e2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.d2 = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d1 = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(w, 5, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(e1)
        d2 = self.d2(torch.cat([self.up2(self.e3(e2)), e2], 1))
        return self.out(self.d1(torch.cat([self.up1(d2), e1], 1)))


def test_unet_skips_upsampling_and_transposed_convs_prunable():
    """Every group but the logits: the transposed conv reads one (its weight's dim 0) and writes another
    (dim 1), and the cost model counts its pruned FLOPs as counting the pruned model does."""
    from multinet.schedule.costs import CostModel

    x = torch.randn(2, 3, 8, 8)
    graph = check_model(randomize_norm_stats(SegmentationUNet()), x)
    for layer in ("e1.0", "e2.0", "e3.0", "up2", "d2.0", "d1.0"):
        assert _group(graph, layer).prunable, (layer, _group(graph, layer).reasons)
    assert "up2" in _group(graph, "e3.0").consumer_names
    read, written = _group(graph, "e3.0"), _group(graph, "up2")
    keep = {read.id: [0, 3, 4, 9, 15], written.id: [1, 2, 6]}
    pruned = multinet.prune(graph, keep)
    up = pruned.get_submodule("up2")
    assert up.weight.shape == (5, 3, 2, 2) and (up.in_channels, up.out_channels) == (5, 3) and len(up.bias) == 3
    removed = {g: [c for c in range(graph.group(g).size) if c not in kept] for g, kept in keep.items()}
    model = CostModel(graph)
    model.terms = [(m, t) for m, t in model.terms if t.needs is None]  # plain surgery adds no bias
    real = multinet.count(pruned, (x,))
    assert model.totals(removed) == (real.flops, real.params)
    assert real.flops < multinet.count(graph.module).flops


@pytest.mark.parametrize("layer, why", [(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), "groups=2"),
                                        (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), "output_size")])
def test_transposed_convs_it_cannot_follow_are_reported(layer, why):
    """A grouped transposed conv and one called with an output_size leave the groups they touch whole."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up, self.head = nn.Conv2d(3, 4, 3, padding=1), layer, nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y = self.up(y, output_size=[8, 8]) if why == "output_size" else self.up(y)
            return self.head(y)

    graph = multinet.trace(Up(), torch.randn(2, 3, 4, 4))
    group = _group(graph, "conv")
    assert not group.prunable and any(why in r for r in group.reasons), group.reasons


@pytest.mark.parametrize("model_cls, shape", [(FPNDetector, (16, 3, 16, 16)), (SegmentationUNet, (16, 3, 8, 8))])
def test_detector_and_segmentation_models_compress_like_the_reference_path(model_cls, shape):
    """The cached-input pipeline keeps the same channels as the full-pass reference on both, and the
    compressed models keep their output structure."""
    torch.manual_seed(0)
    model, x = randomize_norm_stats(model_cls()).eval(), torch.randn(*shape)
    fast = multinet.compress(model, x, ratio=0.3, batch_size=8)
    reference = multinet.compress(model, x, ratio=0.3, batch_size=8, mode="reference")
    assert fast.removed_channels() == reference.removed_channels()
    assert fast.flops_after < fast.flops_before
    with torch.no_grad():
        out, ref = fast.model(x), model(x)
    assert [t.shape for t in torch.utils._pytree.tree_leaves(out)] == [t.shape for t in torch.utils._pytree.tree_leaves(ref)]


def test_a_transposed_conv_consumer_is_resolved_by_least_squares():
    """Channels removed from the group a transposed conv reads: its new weight is the least-squares fit of
    its original outputs from the kept channels, checked against a design matrix built from the layer
    itself (the output of each kept (input channel, kernel tap) alone), not from im2col."""
    from multinet.calib import collect, consumer_specs
    from multinet.pipeline.group_problems import group_problems, to_layer_weights
    from multinet.solve import reconstruct_multi

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(5, 3, 3, stride=2, padding=1, output_padding=1)).eval()
    x = torch.randn(12, 2, 4, 4)
    graph = multinet.trace(model, x[:1])
    group = _group(graph, "0")
    stats = collect(graph.module, consumer_specs(graph, group.consumer_names), x, max_positions=None)
    problems, layout = group_problems(graph, graph, group, stats, 0.0, {})
    removed = [1, 3]
    weight, bias = to_layer_weights(problems, reconstruct_multi(problems, removed, 0.0), layout, removed)["2"]
    up = model[2]
    with torch.no_grad():
        h = model[1](model[0](x)).double()
        target = up(model[1](model[0](x))).double()
    kept = [c for c in range(5) if c not in removed]
    columns = []
    for c in kept:  # the layer's response to one input channel through one kernel tap
        for a in range(3):
            for b in range(3):
                tap = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
                tap[0, 0, a, b] = 1
                columns.append(F.conv_transpose2d(h[:, c:c + 1], tap, stride=2, padding=1, output_padding=1))
    design = torch.stack([t.flatten() for t in columns] + [torch.ones(target[:, 0].numel(), dtype=torch.float64)], 1)
    for o in range(3):
        fit = torch.linalg.lstsq(design, target[:, o].flatten()).solution
        torch.testing.assert_close(weight[:, o].double().flatten(), fit[:-1], rtol=1e-4, atol=1e-4)
        assert float(bias[o]) == pytest.approx(float(fit[-1]), abs=1e-4)
