"""torchvision's detectors and segmentation models (random weights): what compresses, and how.

Needs torchvision, which here means its own environment (see torchvision_zoo.py):

    .venv-tv/bin/python benchmarks/torchvision_dense.py [--models fcn_resnet50 retinanet_resnet50_fpn]

Segmentation models (FCN, DeepLabV3, LR-ASPP) trace whole and are compressed whole. A detector's
forward resizes and batches its images, makes anchors and runs NMS, which no tracer captures: its
``backbone`` (backbone + FPN, nearly all of its FLOPs) is compressed with
``compress(detector, images, submodule="backbone")``, calibrated on what the detector feeds it, and the
detector is run again with the compressed backbone in place. Every prunable group loses 30 % of its
channels by REAP; 16 random images at 224 px calibrate (detectors resize them: min_size = max_size =
224). Random weights: the rows show reach and cost, not accuracy. A failure is reported in its row.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import multinet


def models() -> list[tuple[str, str]]:
    import torchvision.models as tvm

    return ([(n, "segmentation") for n in sorted(tvm.list_models(module=tvm.segmentation))]
            + [(n, "detection") for n in sorted(tvm.list_models(module=tvm.detection))])


def _structure(out) -> list:
    """Keys and shapes of a model's outputs, whatever they nest in (dicts, lists of dicts); a tensor's first
    dim is left out (a detector's boxes per image depend on what its scores pass)."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape[1:])]
    if isinstance(out, dict):
        return [(k, _structure(v)) for k, v in out.items()]
    if isinstance(out, (list, tuple)):
        return [_structure(v) for v in out]
    return [type(out).__name__]


def run_one(name: str, kind: str, ratio: float) -> dict:
    import torchvision.models as tvm

    torch.manual_seed(0)
    sizes = {} if kind == "segmentation" or name.startswith("ssd") else dict(min_size=224, max_size=224)
    model = tvm.get_model(name, weights=None, weights_backbone=None, **sizes).eval()
    images = torch.rand(16, 3, 224, 224)
    row = {"model": name, "compressed": "whole model" if kind == "segmentation" else "backbone (submodule)"}
    start = time.time()
    try:
        submodule = None if kind == "segmentation" else "backbone"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = multinet.compress(model, images, ratio=ratio, batch_size=8, max_positions=32,
                                       submodule=submodule)
    except multinet.MultinetError as exc:
        row["note"] = str(exc).splitlines()[0][:100]
        return row
    whole = [str(w.message) for w in caught if "stay whole" in str(w.message)]
    if whole:  # groups left whole for memory: which, and why
        limit = whole[0].split("more than the ", 1)[-1].split(" this run", 1)[0]
        row["note"] = f"left whole for memory (over {limit}): " + whole[0].split("(group ", 1)[-1].rstrip(")")[:140]
    row["seconds"] = time.time() - start
    groups = f"/{len(multinet.trace(model, images[:1]).groups)}" if submodule is None else ""
    row["groups"] = f"{len(result.groups)}{groups}"
    row["flops"] = f"{result.flops_before / 1e6:,.0f}M -> {result.flops_after / 1e6:,.0f}M"
    row["params"] = f"{result.params_before / 1e6:.1f}M -> {result.params_after / 1e6:.1f}M"
    whole = result.model if submodule is None else result.whole_model
    with torch.no_grad():
        same = _structure(model(images[:2])) == _structure(whole(images[:2]))
    row["runs"] = "yes, same outputs' structure" if same else "NO: output structure changed"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", default="benchmarks/results/torchvision_dense.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    chosen = [(n, k) for n, k in models() if args.models is None or n in args.models]
    header = ["model", "compressed", "groups", "flops", "params", "runs", "seconds", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, kind in chosen:
        row = run_one(name, kind, args.ratio)
        cells = [f"{row[h]:.1f}" if h == "seconds" and h in row else str(row.get(h, "–")) for h in header]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    import torchvision

    lines += ["", f"torch {torch.__version__}, torchvision {torchvision.__version__}; {args.ratio:.0%} of every "
              f"prunable group removed (REAP, sequential); groups: groups compressed (/ all groups, for a whole "
              f"model: the logits' group stays). FLOPs and parameters are the compressed part's."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
