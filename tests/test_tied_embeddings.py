"""Tied embeddings: a layer that reads the stream with the embedding table that wrote it (a language
model's head, ``F.linear(h, embed.weight)``). The table's columns are the width's channels; the head
is bound to the table, cut once with it, and never re-solved (that would rewrite the table)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1, self.fc2 = nn.Linear(width, 64), nn.Linear(64, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return F.linear(self.norm(h), self.embed.weight)


def _reference(model: TinyLM, keep: list[int]) -> TinyLM:
    """The same model written at the smaller width by hand: every weight cut at the kept columns."""
    small = TinyLM(width=len(keep)).eval()
    with torch.no_grad():
        small.embed.weight.copy_(model.embed.weight[:, keep])
        small.fc1.weight.copy_(model.fc1.weight[:, keep])
        small.fc1.bias.copy_(model.fc1.bias)
        small.fc2.weight.copy_(model.fc2.weight[keep])
        small.fc2.bias.copy_(model.fc2.bias[keep])
        small.norm.weight.copy_(model.norm.weight[keep])
        small.norm.bias.copy_(model.norm.bias[keep])
    return small


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_head_is_cut_with_its_table(capture):
    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 50, (4, 7))
    graph = multinet.trace(model, ids, capture=capture)
    (width,) = [g for g in graph.groups if g.size == 32]
    assert width.prunable and width.consumer_names == ["fc1"]  # the head is not a consumer
    keep = [0, 3, 4, 9, 10, 17, 20, 21, 25, 31]
    pruned = multinet.prune(graph, {width.id: keep})
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), _reference(model, keep)(ids), rtol=1e-5, atol=1e-6)
    assert [tuple(p.shape) for p in pruned.parameters() if p.shape[0] == 50] == [(50, 10)]  # one table


def test_a_table_read_by_another_kind_of_op_keeps_the_width_whole():
    class Reused(TinyLM):
        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.embed(ids)))) + self.embed.weight.sum()

    graph = multinet.trace(Reused().eval(), torch.randint(0, 50, (4, 7)))
    (width,) = [g for g in graph.groups if "embed" in g.passthrough]
    assert not width.prunable and "embed.weight` is also used by" in width.reasons[0]


def test_compress_prunes_a_tied_width_and_saves(tmp_path):
    torch.manual_seed(0)
    model, ids = TinyLM().eval(), torch.randint(0, 50, (256, 7))
    result = multinet.compress(model, ids, ratio=0.25)
    assert result.model.get_parameter("embed.weight").shape == (50, 24)
    path = multinet.save(result.model, tmp_path / "tied.mnet")
    with torch.no_grad():
        assert torch.equal(multinet.load(path)(ids[:8]), result.model(ids[:8]))
