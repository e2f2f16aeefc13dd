"""Decoder-only Hugging Face models (Llama, Qwen2: rotary positions, RMSNorm, grouped-query attention
through ``repeat_kv``) through trace, prune, compress and a model file. Built from configs with
random weights: nothing is downloaded."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import multinet

transformers = pytest.importorskip("transformers")


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
    if kind == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2Model(transformers.Qwen2Config(**common)).eval()


def _batch(n: int, tokens: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, tokens), generator=gen),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long)}


def _trace(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx cannot trace them: the torch.export notice
        return multinet.trace(model, batch)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_query_heads_and_gated_mlp_are_groups(kind):
    model = _tiny(kind)
    graph = _trace(model, _batch(2))
    heads = graph.group_of_layer("layers.0.self_attn.q_proj")
    # a channel is one k/v head with its two q heads (head_dim 16): 32 features of q and o, 16 of k and v
    assert heads.prunable and heads.attention_heads and heads.size == 2 and heads.unit == 32
    assert set(heads.producers) == {f"layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert heads.consumer_names == ["layers.0.self_attn.o_proj"]
    mlp = graph.group_of_layer("layers.0.mlp.up_proj")
    assert mlp.prunable and set(mlp.producers) == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"}
    (stream,) = [g for g in graph.groups if not g.prunable]  # the model width: the base model's output
    assert stream.reasons == ["reaches the model output"] and not stream.exact and "RMSNorm" in stream.notes[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_removing_a_kv_head_equals_zeroing_its_query_heads_outputs(kind):
    model = _tiny(kind)
    batch = _batch(3)
    graph = _trace(model, batch)
    heads = graph.group_of_layer("layers.0.self_attn.q_proj")
    full = multinet.prune(graph, {g.id: list(range(g.size)) for g in graph.prunable_groups})
    pruned = multinet.prune(graph, {heads.id: [1]})
    assert pruned.get_submodule("layers.0.self_attn.k_proj").out_features == 16
    reference = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(full(**batch)["last_hidden_state"], graph.module(**batch)["last_hidden_state"])
        reference.layers[0].self_attn.o_proj.weight[:, :32] = 0  # k/v head 0 serves q heads 0 and 1
        torch.testing.assert_close(pruned(**batch)["last_hidden_state"],
                                   reference(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_decoder_compresses_to_a_budget_and_saves(tmp_path):
    model = _tiny("llama")
    calib = _batch(64, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = multinet.compress(model, calib, budget=multinet.Budget(flops=0.6),
                                   options=multinet.RunOptions(batch_size=16, eval_samples=32))
    assert result.flops_after <= 0.6 * result.flops_before
    example = _batch(5, seed=2)  # another batch size than the calibration's
    args = (example["input_ids"], example["attention_mask"])
    multinet.save(result.model, tmp_path / "llama.mnet", example_inputs=args)
    with torch.no_grad():
        out = result.model(*args)["last_hidden_state"]
        assert out.shape == (5, 8, 64)
        assert torch.equal(multinet.load(tmp_path / "llama.mnet")(*args)["last_hidden_state"], out)


def test_a_gap_between_given_inputs_takes_the_argument_default():
    """GPT-2's forward is (input_ids, past_key_values, attention_mask, ...): a batch of input_ids and
    attention_mask binds with past_key_values at its default, instead of failing."""
    from multinet.calib import batches

    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    names = ["input_ids", "past_key_values", "attention_mask", "token_type_ids"]
    bound = batches.as_args({"input_ids": ids, "attention_mask": mask}, names, {"past_key_values": None})
    assert bound[0] is ids and bound[1] is None and bound[2] is mask and len(bound) == 3
    with pytest.raises(multinet.errors.InputShapeError, match="lacks inputs"):
        batches.as_args({"input_ids": ids, "attention_mask": mask}, names)


def test_gpt2_conv1d_layers_are_linears_and_its_heads_groups():
    """GPT-2's Conv1D is ``addmm(bias, x, weight)`` with the weight stored (in, out): capture raises it
    into an nn.Linear, so its packed q/k/v, heads and MLP neurons are groups like any other."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                           bos_token_id=0, eos_token_id=0)).eval()
    batch = _batch(3)
    graph = _trace(model, batch)  # input_ids and attention_mask, past_key_values between them at its default
    attn = graph.module.get_submodule("h.0.attn.c_attn")
    assert isinstance(attn, torch.nn.Linear) and torch.equal(attn.weight, model.h[0].attn.c_attn.weight.t())
    heads = graph.group_of_layer("h.0.attn.c_attn")
    assert heads.prunable and heads.attention_heads and heads.size == 4
    assert graph.group_of_layer("h.0.mlp.c_fc").prunable
    pruned = multinet.prune(graph, {heads.id: [0, 2, 3]})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.h[0].attn.c_proj.weight[16:32] = 0  # head 1's rows of the (in, out) projection
        torch.testing.assert_close(pruned(**batch)["last_hidden_state"], reference(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_gpt2_compresses_sequentially_with_its_packed_heads(tmp_path):
    """The packed c_attn is three parts of one head group: the rows it keeps are tracked per part
    (it used to index the second part past the first's end)."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                           bos_token_id=0, eos_token_id=0)).eval()
    graph = _trace(model, _batch(2))
    heads = graph.group_of_layer("h.0.attn.c_attn")
    rows = multinet.graph.surgery.kept_output_rows(graph, heads.id, [1, 3])["h.0.attn.c_attn"]
    # heads 1 and 3 (16 features each) of q, k and v, at 0, 64 and 128 of the packed output
    assert rows.tolist() == [o + h * 16 + i for o in (0, 64, 128) for h in (1, 3) for i in range(16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = multinet.compress(model, _batch(64, seed=1), budget=multinet.Budget(flops=0.6),
                                   options=multinet.RunOptions(batch_size=16, eval_samples=32))
    assert result.flops_after <= 0.6 * result.flops_before
    batch = _batch(5, seed=2)
    with torch.no_grad():
        assert result.model(**batch)["last_hidden_state"].shape == (5, 8, 64)


def _language_model(kind: str, tied: bool):
    """A tiny Llama or Gemma with a language-model head, its weight tied to the embedding or not."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    return (transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)) if kind == "llama" else
            transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, head_dim=16))).eval()


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_model_width_under_rmsnorm_is_an_inexact_group_with_a_head_on_top(kind):
    """RMSNorm's mean over the channels only rescales the stream: the width is prunable (inexact,
    like LayerNorm) once the stream feeds a head instead of being the output."""
    model = _language_model(kind, tied=False)
    batch = _batch(2)
    graph = _trace(model, batch)
    (width,) = [g for g in graph.groups if g.size == 64]
    assert width.prunable and not width.exact and any("RMSNorm" in n for n in width.notes)
    keep_all = multinet.prune(graph, {width.id: list(range(64))})
    pruned = multinet.prune(graph, {width.id: list(range(0, 64, 2))})
    with torch.no_grad():
        assert torch.equal(keep_all(**batch)["logits"], graph.module(**batch)["logits"])
        assert pruned(**batch)["logits"].shape == (2, 8, 100)
    assert pruned.get_parameter("model.norm.weight").shape == (32,)  # the RMSNorm weight is cut with it
    assert pruned.get_submodule("lm_head").in_features == 32
    assert multinet.count(pruned).flops < 0.6 * multinet.count(graph.module).flops


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_a_width_tied_to_the_embedding_is_prunable_and_the_head_shares_the_cut_table(tmp_path, kind):
    """Tied embeddings (Llama-3.2, Qwen2, Gemma): one parameter is the embedding table and the head's
    weight. The head is bound to the table (its columns cut once, with the table) instead of being a
    re-solved consumer, so the width is prunable and the pruned model keeps one shared table. (Gemma's
    exported graph holds the table under two names: it is read under one.)"""
    model = _language_model(kind, tied=True)
    batch = _batch(2)
    graph = _trace(model, batch)
    (width,) = [g for g in graph.groups if g.size == 64]
    assert width.prunable and "lm_head" not in " ".join(width.consumer_names)
    keep_all = multinet.prune(graph, {width.id: list(range(64))})
    pruned = multinet.prune(graph, {width.id: list(range(0, 64, 2))})
    with torch.no_grad():
        assert torch.equal(keep_all(**batch)["logits"], model(**batch).logits)
        assert pruned(**batch)["logits"].shape == (2, 8, 100)
    tables = [p for _, p in pruned.named_parameters(remove_duplicate=False) if p.shape[0] == 100]
    assert len(tables) == 1 and tables[0].shape == (100, 32)  # one table, read by the embedding and the head
    assert multinet.count(pruned).flops < 0.6 * multinet.count(graph.module).flops
    calib = _batch(48, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = multinet.compress(model, calib, budget=multinet.Budget(flops=0.7))
    assert result.flops_after <= 0.7 * result.flops_before
    path = multinet.save(result.model, tmp_path / "tied.mnet")
    with torch.no_grad():
        assert torch.equal(multinet.load(path)(**batch)["logits"], result.model(**batch)["logits"])


def test_phi3_packed_qkv_under_grouped_query_attention_has_head_groups():
    """Phi-3 packs q (4 heads), k and v (2 heads each) in one Linear and slices it: the q part's channel
    is two q heads, the k and v parts' one head each (a unit per part)."""
    torch.manual_seed(0)
    model = transformers.Phi3Model(transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=4, num_key_value_heads=2,
                                                           vocab_size=100, pad_token_id=0)).eval()
    batch = _batch(3)
    graph = _trace(model, batch)
    heads = graph.group_of_layer("layers.0.self_attn.qkv_proj")
    assert heads.prunable and heads.attention_heads and heads.size == 2
    assert graph.group_of_layer("layers.0.mlp.gate_up_proj").prunable  # gate and up, packed
    pruned = multinet.prune(graph, {heads.id: [1]})
    qkv = pruned.get_submodule("layers.0.self_attn.qkv_proj")
    # k/v head 1 kept: q rows 32:64, k rows 64+16:64+32, v rows 96+16:96+32 of the packed weight
    assert torch.equal(qkv.weight, model.layers[0].self_attn.qkv_proj.weight[[*range(32, 64), *range(80, 96),
                                                                              *range(112, 128)]])
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.layers[0].self_attn.o_proj.weight[:, :32] = 0  # q heads 0 and 1, served by k/v head 0
        torch.testing.assert_close(pruned(**batch)["last_hidden_state"], reference(**batch).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
