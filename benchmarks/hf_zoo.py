"""Hugging Face architectures through multinet (tiny configs, random weights: nothing downloaded).

    python benchmarks/hf_zoo.py [--out benchmarks/results/hf_zoo.md]

For each architecture: build a 2-layer model from its config class, trace it with a dict batch
(input_ids + attention_mask; pixel_values for vision models), prune a random 30 % of every prunable
group, run the pruned model (same output shapes), save it to a model file and load it back (same
outputs), and compress it with REAP under a 70 % FLOPs budget (auto schedule, 64 random samples: it
checks the main API runs, random weights say nothing of quality). One row per model: how it was
captured, groups, prunable groups, attention-head groups (prunable/all), whether the pruned model
runs and round-trips, what REAP reached, and why the rest stays whole.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import multinet

RESULTS = Path(__file__).parent / "results" / "hf_zoo.md"
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
DECODER = dict(TEXT, num_key_value_heads=2)  # grouped-query attention where the architecture has it


def architectures(t) -> dict[str, callable]:
    """name -> a function building the model (transformers imported as ``t``)."""
    def ids(token=0):
        return dict(bos_token_id=token, eos_token_id=token, pad_token_id=token)

    return {
        "bert": lambda: t.BertModel(t.BertConfig(**TEXT)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**TEXT)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                                                   vocab_size=100)),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(embedding_size=64, **TEXT)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, **ids())),
        "opt": lambda: t.OPTModel(t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                              word_embed_proj_dim=64, vocab_size=100, **ids(1))),
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**DECODER)),
        "qwen2": lambda: t.Qwen2Model(t.Qwen2Config(**DECODER)),
        "mistral": lambda: t.MistralModel(t.MistralConfig(**DECODER)),
        "phi3": lambda: t.Phi3Model(t.Phi3Config(**DECODER, pad_token_id=0)),
        "gemma": lambda: t.GemmaModel(t.GemmaConfig(**DECODER, head_dim=16)),
        "llama-lm": lambda: t.LlamaForCausalLM(t.LlamaConfig(**DECODER)),  # a head on the stream: width prunable
        "gemma-lm": lambda: t.GemmaForCausalLM(t.GemmaConfig(**DECODER, head_dim=16, tie_word_embeddings=False)),
        # Gemma's default: the head reads the stream with the embedding table (bound to it, cut with it)
        "gemma-lm-tied": lambda: t.GemmaForCausalLM(t.GemmaConfig(**DECODER, head_dim=16, tie_word_embeddings=True)),
        "qwen2-lm-tied": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**DECODER, tie_word_embeddings=True)),
        "vit": lambda: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in TEXT.items()
                                                                               if k != "vocab_size"})),
        "deit": lambda: t.DeiTModel(t.DeiTConfig(image_size=32, patch_size=8, **{k: v for k, v in TEXT.items()
                                                                                 if k != "vocab_size"})),
    }


def example(name: str, n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name in ("vit", "deit"):
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(3, 100, (n, 8), generator=gen), "attention_mask": torch.ones(n, 8, dtype=torch.long)}


def reap_to_budget(model, name: str) -> str:
    """The main API on the architecture: REAP under a FLOPs budget with the auto schedule (random
    weights and random tokens: this checks that calibration, the schedule and surgery run, not quality)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = multinet.compress(model, example(name, 64, seed=1), budget=multinet.Budget(flops=0.7),
                                       options=multinet.RunOptions(batch_size=16, eval_samples=32))
            out = leaves(result.model(**example(name, 3, seed=2)))
        ok = all(torch.isfinite(o).all() for o in out)
        return f"{result.flops_after / result.flops_before:.0%} FLOPs" + ("" if ok else ", non-finite outputs")
    except Exception as exc:
        return f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def leaves(out) -> list[torch.Tensor]:
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    return [v for v in values if isinstance(v, torch.Tensor)]


def run_one(name: str, build) -> dict:
    torch.manual_seed(0)
    row = {"model": name}
    start = time.perf_counter()
    try:
        model = build().eval()
    except Exception as exc:  # an architecture this transformers lacks or configures differently
        return row | {"captured": f"not built: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    batch = example(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = multinet.trace(model, batch)
        except Exception as exc:
            return row | {"captured": f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    exported = any("torch.export" in str(w.message) for w in caught)
    heads = [g for g in graph.groups if g.attention_heads]
    row |= {"captured": "torch.export" if exported else "fx", "groups": len(graph.groups),
            "prunable": len(graph.prunable_groups), "heads": f"{sum(g.prunable for g in heads)}/{len(heads)}"}
    gen = torch.Generator().manual_seed(0)
    keep = {g.id: sorted(torch.randperm(g.size, generator=gen)[:max(1, round(0.7 * g.size))].tolist())
            for g in graph.prunable_groups if not g.grouped_conv}
    args = graph.example_inputs
    try:
        pruned = multinet.prune(graph, keep)
        with torch.no_grad():
            out, ref = leaves(pruned(*args)), leaves(graph.module(*args))
        row["runs"] = "yes" if [o.shape for o in out] == [r.shape for r in ref] else "shape changed"
        before, after = multinet.count(graph.module).flops, multinet.count(pruned).flops
        row["flops"] = f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M"
        with tempfile.TemporaryDirectory() as folder:
            multinet.save(pruned, Path(folder) / "m.mnet", example_inputs=args)
            with torch.no_grad():
                back = leaves(multinet.load(Path(folder) / "m.mnet")(*args))
            row["saved"] = "yes" if all(torch.equal(a, b) for a, b in zip(back, out)) else "outputs differ"
    except Exception as exc:
        row["runs"] = row.get("runs", f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        row.setdefault("saved", f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    row["REAP, 70 % budget"] = reap_to_budget(model, name) if graph.prunable_groups else "nothing to prune"
    whole = sorted({r.split(" at `")[0] for g in graph.groups if not g.prunable for r in g.reasons})
    row["whole because"] = "; ".join(whole)[:160]
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


COLUMNS = ["model", "captured", "groups", "prunable", "heads", "runs", "saved", "flops", "REAP, 70 % budget", "seconds",
           "whole because"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]  # benchmarks/transformers.py
    import transformers

    torch.set_num_threads(2)
    builders = architectures(transformers)
    rows = []
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    for name in args.models or builders:
        row = run_one(name, builders[name])
        rows.append(row)
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
        print(lines[-1], flush=True)
    traced = [r for r in rows if "groups" in r]
    head_counts = [tuple(map(int, r["heads"].split("/"))) for r in traced]
    summary = (f"{len(rows)} architectures (transformers {transformers.__version__}, torch {torch.__version__}): "
               f"{len(traced)} traced, {sum(r.get('runs') == 'yes' for r in rows)} pruned models ran, "
               f"{sum(r.get('saved') == 'yes' for r in rows)} saved and reloaded with equal outputs, "
               f"{sum(str(r.get('REAP, 70 % budget', '')).endswith('FLOPs') for r in rows)} compressed by REAP to a "
               f"70 % FLOPs budget; "
               f"{sum(r['prunable'] for r in traced)} of {sum(r['groups'] for r in traced)} groups prunable, "
               f"{sum(p for p, _ in head_counts)} of {sum(a for _, a in head_counts)} attention-head groups.")
    print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Hugging Face architectures (`python benchmarks/hf_zoo.py`)\n\n{summary}\n\n"
                        + "\n".join(lines) + "\n\nTiny configs (2 layers, width 64, 4 heads, 2 k/v heads where the "
                        "architecture has grouped-query attention), random weights; a random 30 % of every prunable "
                        "group removed.\n")


if __name__ == "__main__":
    main()
