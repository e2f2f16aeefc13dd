"""What a compression run costs, in units of one plain forward pass over the same calibration set.

    python benchmarks/scale.py [--images 64] [--size 112] [--threads 2] [--models resnet50 vit zoo-resnet]

Each configuration runs in a fresh process (so its peak memory is its own): the model is built
with random weights (timing only), one plain forward pass over the calibration images is timed,
then the compression; the table gives the run in units of that pass, the pipeline's phase
breakdown (forward segments, statistics, solves, surgery) and the process's peak resident memory.
ResNet-50 is also written out here with torchvision's topology (bottlenecks [3, 4, 6, 3], widths
64..2048), and the ViT is a ViT-S/16-shaped encoder (6 blocks, width 384, 6 heads,
nn.MultiheadAttention), so the benchmark runs beside this project's torch. torchvision's own models
(``tv:resnet50``, ``tv:convnext_tiny``, ``tv:vit_b_16``; random weights) need torchvision, which needs
another torch: give that environment's interpreter with ``--python`` (see the README's torchvision
section for the one-line venv), e.g.

    python benchmarks/scale.py --models tv:resnet50 tv:convnext_tiny tv:vit_b_16 --python .venv-tv/bin/python
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, size: int, width: int = 384, depth: int = 6, heads: int = 6, patch: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1000)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


def build(name: str, size: int):
    torch.manual_seed(0)
    if name == "resnet50":
        return ResNet50().eval(), torch.randn(1, 3, size, size)
    if name == "vit":
        return ViT(size).eval(), torch.randn(1, 3, size, size)
    if name.startswith("tv:"):
        import torchvision.models as tvm

        kwargs = {"image_size": size} if name.startswith("tv:vit") else {}  # ViTs take the size they run at
        return getattr(tvm, name[3:])(weights=None, **kwargs).eval(), torch.randn(1, 3, size, size)
    from multinet import data, zoo

    return zoo.create("resnet"), data.load("digits").train_x[:1]


def calibration_images(example: torch.Tensor, images: int) -> torch.Tensor:
    """``images`` copies of ``example`` with noise: random-weight models time the same on any inputs."""
    return example.repeat(images, *([1] * (example.ndim - 1))) + 0.1 * torch.randn(images, *example.shape[1:])


CONFIGS = {  # label -> compress keyword arguments
    "sequential, ratio 0.3": dict(ratio=0.3),
    "one-shot, ratio 0.3": dict(ratio=0.3, mode="oneshot"),
    "sequential, auto, 50 % FLOPs": dict(budget="flops=0.5"),
    "one-shot, auto, 50 % FLOPs": dict(budget="flops=0.5", mode="oneshot"),
    "reference (full passes), ratio 0.3": dict(ratio=0.3, mode="reference"),
}


def worker(name: str, label: str, images: int, size: int, threads: int, repeats: int = 5) -> dict:
    import multinet

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    model, example = build(name, size)
    images = 1024 if name == "zoo-resnet" else images  # 8x8 digits: a real calibration set
    x = calibration_images(example, images)
    with torch.no_grad():
        model(x[:8])
        times = []
        for _ in range(repeats):  # the median of several passes: one noisy pass would skew every ratio
            start = time.perf_counter()
            for i in range(0, images, 32):
                model(x[i:i + 32])
            times.append(time.perf_counter() - start)
        forward = sorted(times)[len(times) // 2]
    kwargs = dict(CONFIGS[label])
    if "budget" in kwargs:
        kwargs["budget"] = multinet.Budget(flops=float(kwargs["budget"].split("=")[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = multinet.compress(model, x, batch_size=32, max_positions=64, eval_samples=images, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases = result.cost.seconds if result.cost is not None else {}
    return {"model": name, "config": label, "forward_s": forward, "compress_s": seconds,
            "passes": seconds / forward, "phases": {k: v / forward for k, v in phases.items()},
            "schedule_s": sum(result.plan.seconds.values()) / forward if result.plan is not None else 0.0,
            "schedule_parts": ({k: v / forward for k, v in result.plan.seconds.items()}
                               if result.plan is not None else {}),
            "evaluations": result.plan.evaluations if result.plan is not None else 0.0,
            "flops_kept": result.flops_after / result.flops_before, "peak_mb": peak / 1024,
            "peak_extra_mb": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo-resnet", "resnet50", "vit"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="plain passes timed (their median is the unit)")
    parser.add_argument("--out", default="benchmarks/results/scale.md")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs each configuration")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.images, args.size, args.threads, args.repeats)))
        return
    header = ("model", "run", "plain pass s", "run in passes", "forward", "statistics", "solve", "surgery",
              "scheduling", "FLOPs kept", "peak MB")
    lines = [f"{args.images} images at {args.size}x{args.size} (the zoo ResNet: 1,024 8x8 digits), batches of 32, "
             f"{args.threads} threads; phases in passes", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n".join(lines), flush=True)
    notes: list[str] = []
    for name in args.models:
        for label in args.configs:
            if name != "zoo-resnet" and "reference" in label:
                continue  # hundreds of passes on a real model: the reason the pipeline exists
            out = subprocess.run([args.python, __file__, "--worker", name, label, "--images", str(args.images),
                                  "--size", str(args.size), "--threads", str(args.threads),
                                  "--repeats", str(args.repeats)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                row = f"| {name} | {label} | failed: {out.stderr.strip().splitlines()[-1][:120]} |" + " |" * 9
            else:
                r = json.loads(out.stdout.strip().splitlines()[-1])
                p = r["phases"]
                cells = [name, label, f"{r['forward_s']:.2f}", f"{r['passes']:.1f}",
                         *(f"{p[k]:.1f}" if k in p else "–" for k in ("forward", "statistics", "solve", "surgery")),
                         f"{r['schedule_s']:.1f}" if r["schedule_s"] else "–", f"{r['flops_kept']:.0%}",
                         f"{r['peak_mb']:.0f}"]
                row = "| " + " | ".join(cells) + " |"
                if r["schedule_parts"]:
                    notes.append(f"- {name}, {label}: scheduling = " + ", ".join(
                        f"{k} {v:.1f}" for k, v in r["schedule_parts"].items())
                        + f" passes; the search's masked evaluations: {r['evaluations']:.1f} passes over "
                        "the evaluation samples")
            lines.append(row)
            print(row, flush=True)
    if notes:
        lines += [""] + notes
        print("\n".join(notes), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
