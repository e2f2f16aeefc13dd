"""The one script a GPU run needs: solvers, calibration and whole compression runs on CUDA vs the CPU.

    python benchmarks/gpu_check.py [--device cuda] [--quick]

1. REAP solvers: the inverse form on the CPU, the inverse form on the device and the Gram-Schmidt
   form on the device, for growing problems: same removal order, error difference, times. (The
   measurement that picks the form for the device.)
2. Calibration statistics of a zoo model on the device vs the CPU.
3. Whole runs on the device vs the CPU, zoo ResNet: sequential pipeline, one-shot, and a FLOPs budget
   with the auto schedule: same removed channels, accuracy.
4. Scale: ResNet-50 (benchmarks/scale.py's model, random weights) compressed on the device, in
   units of one plain forward pass there, with the pipeline's phase breakdown.
5. MultiNet forms on the device: an ensemble of three zoo ResNets, an MLP pair and VGG+ResNet+MLP run
   as built, fused, fused with the members' same-shaped layers batched (``net.fused(batched=True)``),
   and fused with the members' own parts overlapped on CUDA streams (``net.fused().overlapped()``),
   against the members run one after another: outputs equal, ms per batch, and the forms
   ``infer(fuse="auto")`` and ``infer(overlap="auto")`` pick there.

``--device cpu`` runs the same checks with the CPU as the "device" (a dry run of the script on a
machine without a GPU). Exits 1 on any mismatch, 0 when all agree (or when there is no device).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import multinet
from multinet import data, zoo
from multinet.calib import collect, consumer_specs
from multinet.solve import reap_greedy, reap_greedy_gs


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check_solvers(device: str, quick: bool) -> bool:
    ok = True
    sizes = ((64, 1), (64, 9)) if quick else ((64, 1), (512, 1), (64, 9), (256, 9), (512, 9))
    for channels, block in sizes:
        gen = torch.Generator().manual_seed(0)
        m = channels * block
        x = torch.randn(2 * m, m, generator=gen, dtype=torch.float64)
        gram, weight = x.T @ x, torch.randn(m, 256, generator=gen, dtype=torch.float64)
        steps = channels // 3
        cpu, t_cpu = timed(lambda: reap_greedy(gram, weight, steps, block=block), "cpu")
        inv, t_inv = timed(lambda: reap_greedy(gram.to(device), weight.to(device), steps, block=block), device)
        line = (f"C={channels:4d} block={block} m={m:5d}: inverse CPU {t_cpu:7.3f}s  inverse {device} {t_inv:7.3f}s"
                f"  same order {cpu.removed == inv.removed}")
        ok &= cpu.removed == inv.removed
        if m <= 1024:  # the Gram-Schmidt form factors one m x m Gram per candidate: only small problems
            gs, t_gs = timed(lambda: reap_greedy_gs(gram.to(device), weight.to(device), steps, block=block,
                                                    chunk=max(1, 2**26 // (m * m))), device)
            diff = (cpu.errors - gs.errors.cpu()).abs().max().item() / cpu.errors.abs().max().item()
            ok &= cpu.removed == gs.removed and diff < 1e-6
            line += f"  |  GS {device} {t_gs:7.3f}s same order {cpu.removed == gs.removed} err diff {diff:.1e}"
        print(line)
    return ok


def check_calibration(device: str) -> bool:
    ok = True
    split = data.load("digits")
    graph = multinet.trace(zoo.create("resnet"), split.train_x[:2])
    names = graph.prunable_groups[0].consumer_names
    specs = consumer_specs(graph, names)
    cpu_stats = collect(graph.module, specs, split.train_x[:512])
    dev_stats = collect(graph.module, specs, split.train_x[:512], device=device)
    for name in names:
        rel = ((cpu_stats[name].gram - dev_stats[name].gram.cpu()).abs().max()
               / cpu_stats[name].gram.abs().max()).item()
        ok &= rel < 1e-5
        print(f"calibration `{name}` {device} vs CPU max rel diff {rel:.1e}")
    return ok


def check_runs(device: str) -> bool:
    ok = True
    split = data.load("digits")
    x = split.train_x[:1024]
    for label, kwargs in (("sequential, ratio 0.3", dict(ratio=0.3)),
                          ("one-shot, ratio 0.3", dict(ratio=0.3, mode="oneshot")),
                          ("sequential, auto, 50 % FLOPs", dict(budget=multinet.Budget(flops=0.5)))):
        model = zoo.create("resnet")
        cpu = multinet.compress(model, x, max_positions=64, eval_samples=256, **kwargs)
        dev, seconds = timed(lambda: multinet.compress(model, x, max_positions=64, eval_samples=256, device=device,
                                                       **kwargs), device)
        same = [g.removed for g in cpu.groups] == [g.removed for g in dev.groups]
        acc_cpu = data.accuracy(cpu.model, split.test_x, split.test_y)
        acc_dev = data.accuracy(dev.model.cpu(), split.test_x, split.test_y)
        ok &= abs(acc_cpu - acc_dev) <= 0.01  # near-ties may resolve differently on another device
        print(f"{label}: {device} {seconds:.1f}s, same removals {same}, accuracy {device} {acc_dev:.3f} "
              f"CPU {acc_cpu:.3f}")
    return ok


def check_scale(device: str, images: int, size: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import build, calibration_images

    model, example = build("resnet50", size)
    model = model.to(device)
    x = calibration_images(example, images).to(device)
    with torch.no_grad():
        model(x[:8])
        _, forward = timed(lambda: [model(x[i:i + 32]) for i in range(0, images, 32)], device)
    for mode in ("sequential", "oneshot"):
        result, seconds = timed(lambda: multinet.compress(model, x, ratio=0.3, batch_size=32, max_positions=64,
                                                          eval_samples=images, device=device, mode=mode), device)
        phases = ", ".join(f"{k} {v / forward:.1f}" for k, v in (result.cost.seconds or {}).items()) \
            if result.cost is not None else ""
        print(f"ResNet-50 {images} images at {size}x{size}, {mode}: {seconds / forward:.1f} forward passes "
              f"(pass {forward:.3f}s){'; ' + phases if phases else ''}")


def check_forms(device: str, repeats: int = 50) -> bool:
    from multinet import MultiNet
    from multinet.runtime.infer import faster_form, faster_overlap
    from multinet.unification.batching import batched_count

    ok = True
    split = data.load("digits")
    x = split.test_x[:256].to(device)
    for kinds in (("resnet", "resnet", "resnet"), ("mlp", "mlp"), ("vgg", "resnet", "mlp")):
        torch.manual_seed(0)
        members = {f"{k}{i}": zoo.create(k).eval() for i, k in enumerate(kinds)}
        net = MultiNet(members, split.train_x[:1]).eval()
        forms = {"as built": net, "fused": net.fused(), "batched": net.fused(batched=True),
                 "fused, overlapped": net.fused().overlapped()}
        forms = {k: f.to(device).eval() for k, f in forms.items()}
        times = {}
        with torch.no_grad():
            ref = forms["as built"](x)
            for name, form in forms.items():
                out = form(x)
                ok &= all(torch.allclose(out[m], ref[m], atol=1e-4, rtol=1e-4) for m in ref)
                times[name] = sorted(timed(lambda: form(x), device)[1] for _ in range(repeats))[repeats // 2]
            picked = faster_form(net, split.test_x[:256], torch.device(device))
            overlap = faster_overlap(picked, split.test_x[:256], torch.device(device)).is_overlapped
            members = {m: f.to(device) for m, f in members.items()}
            times["one after another"] = sorted(timed(lambda: {m: f(x) for m, f in members.items()}, device)[1]
                                                for _ in range(repeats))[repeats // 2]
        picked_name = ("as built" if not picked.is_fused else
                       "batched" if batched_count(picked.graph_module) else "fused")
        print(f"MultiNet {'+'.join(kinds)} on {device}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
              + f"; {batched_count(forms['batched'].graph_module)} batched ops; auto picks {picked_name}"
              + (", overlapped" if overlap else ", not overlapped"))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small problems only, no scale run")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    ok = check_solvers(args.device, args.quick)
    ok &= check_calibration(args.device)
    ok &= check_runs(args.device)
    ok &= check_forms(args.device)
    if not args.quick:
        check_scale(args.device, args.images, args.size)
    print("ALL OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
