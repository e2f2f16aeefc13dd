"""Transformers side by side (issue 12, item 7): encoders that read the same token ids form one
MultiNet with named inputs, and unification links their channels-last Linear layers by R²."""
import copy
import warnings

import pytest
import torch

import multinet
from multinet.calib import batches

transformers = pytest.importorskip("transformers")

from test_transformers import _bert, _data, _hidden  # noqa: E402


def _other_bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=16, attn_implementation="sdpa")
    torch.manual_seed(7)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _state(out):
    return out["last_hidden_state"] if isinstance(out, dict) else out[0]


def test_a_multinet_of_encoders_takes_named_inputs_and_equals_its_members():
    a, b = _bert(), _other_bert()
    data = _data(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the torch.export fallback notice
        net = multinet.MultiNet({"a": a, "b": b}, batches.take(data, 0, 1))
    assert batches.input_names(net) == ["input_ids", "attention_mask"]
    with torch.no_grad():
        out = batches.call(net, data)
    torch.testing.assert_close(_state(out["a"]), _hidden(a, data))
    torch.testing.assert_close(_state(out["b"]), _hidden(b, data))


@pytest.fixture(scope="module")
def copies():
    a = _bert()
    data = _data(192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        forward = multinet.unify({"a": a, "b": copy.deepcopy(a)}, data, budget=0.5, batch_size=32)
        backward = multinet.unify({"b": copy.deepcopy(a), "a": a}, data, budget=0.5, batch_size=32)
    return a, data, forward, backward


def test_copies_of_an_encoder_link_their_token_layers_and_beat_separate_compression(copies):
    a, data, unified, _ = copies
    assert unified.bridges and all(b.r2 > 0.999 for b in unified.bridges)
    assert all(".output.dense" in b.consumer for b in unified.bridges)  # heads and FFN neurons feed them
    for member in ("a", "b"):
        assert unified.errors[member]["unified"] <= unified.errors[member]["separate"]
    assert unified.costs_after["shared"]["flops"] > 0
    with torch.no_grad():
        out = batches.call(unified.model, data)
    reference = _hidden(a, data)
    for member in ("a", "b"):
        cosine = torch.nn.functional.cosine_similarity(_state(out[member]).flatten(1), reference.flatten(1))
        assert cosine.mean() > 0.9


def test_the_order_of_the_encoders_does_not_matter(copies):
    _, _, forward, backward = copies
    for member in ("a", "b"):
        assert forward.errors[member]["unified"] == pytest.approx(backward.errors[member]["unified"], rel=1e-6)
