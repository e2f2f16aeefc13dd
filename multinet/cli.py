"""The ``multinet`` command line.

    multinet inspect zoo:resnet
    multinet inspect torchvision.models:resnet18 --input-shape 1,3,224,224
    multinet inspect mypkg.models:build --input-shape 1,3,32,32 --checkpoint weights.pt
    multinet compress zoo:resnet --ratio 0.5 --method reap
    multinet compress zoo:resnet --flops 0.4 --schedule auto --plan-out plan.json
    multinet run scenarios/quickstart.yaml --out runs/quickstart [--resume] [--set data.calibration=512]
    multinet report runs/quickstart
    multinet infer runs/quickstart/resnet.mnet --dataset digits

Exit codes: 0 ok, 2 bad input (the message says what), 1 internal failure.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .errors import MultinetError
from .io.sources import load_target


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise MultinetError(f"--input-shape {text!r} must be integers separated by commas, e.g. 1,3,32,32") from None
    if not shape or min(shape) <= 0:
        raise MultinetError(f"--input-shape {text!r} must be positive")
    return shape


def example_for(model: torch.nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """One example input: --input-shape, else the shape a .mnet file recorded, else the zoo dataset's."""
    from . import zoo

    shapes = model.meta.get("input_shapes") if hasattr(model, "meta") else None
    if args.input_shape:
        return torch.zeros(parse_shape(args.input_shape))
    if shapes:
        return torch.zeros((1, *shapes[0][1:]))
    if args.model.startswith("zoo:"):
        return zoo.example_input(args.dataset, batch=1)
    raise MultinetError("--input-shape is required for a module:factory model (e.g. --input-shape 1,3,32,32)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import count, trace
    from .scenario.tables import groups_table, print_table

    model = load_target(args.model, args.checkpoint, args.dataset)
    example = example_for(model, args)
    graph = trace(model, example)
    counts = count(graph.module)
    print_table(groups_table(graph, title=f"{args.model}  input {tuple(example.shape)}"))
    if args.layers:
        from .scenario.tables import layers_table

        print_table(layers_table(counts))
    if args.evaluate:
        if not args.model.startswith("zoo:"):
            raise MultinetError("--evaluate needs a zoo model (its dataset is built in)")
        from .io import data

        split = data.load(args.dataset)
        acc = data.accuracy(graph.module, split.test_x, split.test_y)
        print(f"test accuracy on {args.dataset} ({len(split.test_y)} held-out images): {acc:.4f}")
    prunable = graph.prunable_groups
    print(f"{len(graph.groups)} groups, {len(prunable)} prunable "
          f"({sum(g.size for g in prunable)} of {sum(g.size for g in graph.groups)} channels); "
          f"FLOPs (MACs) {counts.flops:,}  params {counts.params:,}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model on a built-in dataset and report groups, FLOPs and accuracy before -> after."""
    import warnings

    from .io import data
    from .pipeline.compression import compress
    from .scenario.tables import compress_table, print_table

    budget = _budget(args)
    if args.ratio is not None and (budget is not None or args.plan):
        raise MultinetError("give --ratio, a budget (--flops/--params/--latency-ms) or --plan, not several")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise MultinetError(f"--ratio must lie in [0, 1), got {args.ratio}")
    if args.calibration < 1:
        raise MultinetError("--calibration must be at least 1 sample")
    plan = None
    if args.plan:
        from .schedule import Plan

        plan = Plan.load(args.plan)
    model = load_target(args.model, args.checkpoint, args.dataset)
    split = data.load(args.dataset)
    calib = split.train_x[: args.calibration]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, calib, ratio=args.ratio, method=args.method, budget=budget, schedule=args.schedule,
                          plan=plan, plan_path=args.plan_out, max_positions=args.max_positions, seed=args.seed,
                          progress=sys.stderr.isatty() and not args.quiet)
    before = data.accuracy(model, split.test_x, split.test_y)
    after = data.accuracy(result.model, split.test_x, split.test_y)
    if result.plan is not None:
        p = result.plan
        how = f"{p.schedule} schedule, {p.metric} budget"
    else:
        how = f"{args.method}, {0.5 if args.ratio is None else args.ratio:.0%} of every prunable group"
    print_table(compress_table(result, title=f"{args.model}: {how}"))
    print(f"FLOPs (MACs) {result.flops_before:,} -> {result.flops_after:,} "
          f"({result.flops_after / result.flops_before:.1%} kept); params {result.params_before:,} -> "
          f"{result.params_after:,}")
    print(f"test accuracy on {args.dataset} ({len(split.test_y)} held-out images, no fine-tuning): "
          f"{before:.4f} -> {after:.4f}")
    if result.plan is not None:
        p = result.plan
        unit = "ms" if p.metric == "latency" else p.metric
        print(f"budget: {p.metric} <= {p.target:,.3f} {unit} (original {p.original:,.3f}); achieved "
              f"{p.measured_cost:,.3f}; final-output error predicted {p.predicted_error:.5f}, measured "
              f"{p.measured_error:.5f}; scheduling took {sum(p.seconds.values()):.1f} s")
        if args.plan_out:
            print(f"plan written to {args.plan_out}")
    if args.save:
        from .io import save

        print(f"model written to {save(result.model, args.save)} (load with multinet.load)")
    for w in {str(w.message) for w in caught if "calibration rows" in str(w.message) or "budget" in str(w.message)}:
        print(f"note: {w}", file=sys.stderr)
    return 0


def _budget(args: argparse.Namespace):
    """A Budget from the command line flags, or None when none is given."""
    if args.flops is None and args.params is None and args.latency_ms is None:
        if args.round_to != 1 or args.ignore or args.min_channels is not None or args.plan_out:
            raise MultinetError("--round-to, --ignore, --min-channels and --plan-out need a budget "
                                "(--flops, --params or --latency-ms)")
        return None
    from .schedule import Budget

    return Budget(flops=args.flops, params=args.params, latency_ms=args.latency_ms, device=args.device,
                  latency_batch=args.latency_batch, round_to=args.round_to, ignore=tuple(args.ignore),
                  min_channels=args.min_channels, residual_streams=not args.keep_residual)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a scenario file and write its run directory."""
    from .scenario import load_scenario, run

    overrides = list(args.set)
    if args.ray_address:
        overrides += ["runtime.executor=ray", f"runtime.address={args.ray_address}"]
    scenario = load_scenario(args.scenario, overrides)
    out = args.out or _default_run_dir(scenario.name, args.resume)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(scenario, out, resume=args.resume, progress=sys.stderr.isatty() and not args.quiet, log=log)
    from .scenario.report import markdown

    if not args.quiet:
        for note in dict.fromkeys(str(w.message) for w in caught):
            print(f"note: {note}", file=sys.stderr)

    print(markdown(report))
    print(f"run directory: {out}")
    return 0


def _default_run_dir(name: str, resume: bool) -> str:
    """runs/NAME, or runs/NAME-2, -3... when earlier runs are there (--resume: the latest one)."""
    from pathlib import Path

    candidates = [Path(f"runs/{name}")] + [Path(f"runs/{name}-{i}") for i in range(2, 10_000)]
    i = 0
    while i + 1 < len(candidates) and candidates[i].exists():
        i += 1
    return str(candidates[max(i - 1, 0)] if resume else candidates[i])


def cmd_report(args: argparse.Namespace) -> int:
    """Print a finished run's report (and redraw its plot)."""
    from pathlib import Path

    from .scenario.report import markdown, read_report, write_report

    report = read_report(args.run_dir)
    if not args.no_plot:
        write_report(Path(args.run_dir), report)
    print(markdown(report))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Batch inference of a model (or a saved MultiNet) on a built-in dataset's test split."""
    import time

    from .io import data
    from .runtime.infer import infer

    model = load_target(args.model, None, args.dataset)
    split = data.load(args.dataset)
    start = time.perf_counter()
    outputs = infer(model, split.test_x, batch_size=args.batch_size, device=args.device,
                    progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    outputs = outputs if isinstance(outputs, dict) else {"output": outputs}
    for name, out in outputs.items():
        print(f"{name}: accuracy {data.accuracy_of(out, split.test_y):.4f} on {len(split.test_y)} {args.dataset} "
              f"test images")
    print(f"{len(split.test_x) / seconds:,.0f} images/s (batch {args.batch_size}, {args.device})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model (a .mnet file, zoo or factory model) to ONNX or torch.export."""
    from .io import export

    model = load_target(args.model, None, args.dataset)
    print(f"written {export(model, example_for(model, args), args.out, format=args.format)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multinet", description="Compress and merge PyTorch models without retraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="trace a model and list its channel groups, FLOPs and params")
    p.add_argument("model", help="zoo:NAME, module.path:factory or a saved .mnet file")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32 (zoo models know theirs)")
    p.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    p.add_argument("--dataset", default="digits", help="zoo models: which dataset's size and weights (digits, mnist)")
    p.add_argument("--layers", action="store_true", help="also list FLOPs and params per layer")
    p.add_argument("--evaluate", action="store_true", help="zoo models: measure test accuracy on the built-in data")
    p.set_defaults(func=cmd_inspect)
    c = sub.add_parser("compress", help="compress a model on built-in data without retraining")
    c.add_argument("model", help="zoo:NAME or module.path:factory (taking the dataset's images)")
    c.add_argument("--ratio", type=float, help="fraction of channels removed from every prunable group (default 0.5 "
                   "when no budget is given)")
    c.add_argument("--flops", type=float, help="budget: keep at most this fraction of the FLOPs")
    c.add_argument("--params", type=float, help="budget: keep at most this fraction of the parameters")
    c.add_argument("--latency-ms", type=float, help="budget: at most this median latency (ms per batch)")
    c.add_argument("--device", default="cpu", help="where latency is measured (cpu, cuda)")
    c.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement")
    c.add_argument("--schedule", default="auto", choices=["auto", "exhaustive", "uniform"],
                   help="how a budget is shared among groups")
    c.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    c.add_argument("--ignore", action="append", default=[], help="layer name or glob whose outputs stay (repeatable)")
    c.add_argument("--min-channels", type=int, help="channels every group keeps at least (default 1)")
    c.add_argument("--keep-residual", action="store_true", help="leave residual streams whole")
    c.add_argument("--plan-out", help="write the schedule's plan (JSON) here")
    c.add_argument("--plan", help="apply a plan written earlier by --plan-out")
    c.add_argument("--save", help="write the compressed model here (.mnet: tensors and a graph manifest, no pickle)")
    c.add_argument("--method", default="reap", choices=["reap", "magnitude", "magnitude+ls", "random"])
    c.add_argument("--dataset", default="digits", help="built-in data for calibration and evaluation (digits, mnist)")
    c.add_argument("--calibration", type=int, default=1024, help="calibration samples from the training split")
    c.add_argument("--max-positions", type=int, default=64, help="conv output positions sampled per image")
    c.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)
    r = sub.add_parser("run", help="run a scenario YAML file")
    r.add_argument("scenario")
    r.add_argument("--out", help="run directory (default runs/<scenario name>, numbered when taken)")
    r.add_argument("--resume", action="store_true", help="continue a killed run after its last finished step")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set steps.0.compress.budget.flops=0.3 (repeatable)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--ray-address", help="run the jobs on a Ray cluster: 'auto' (inside `ray job submit`), host:port, "
                   "or 'local' to start one here")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="print a finished run's report and redraw its plot")
    rp.add_argument("run_dir")
    rp.add_argument("--no-plot", action="store_true")
    rp.set_defaults(func=cmd_report)
    i = sub.add_parser("infer", help="batch inference of a model or saved .mnet file on built-in data")
    i.add_argument("model", help="a .mnet file, zoo:NAME or module.path:factory")
    i.add_argument("--dataset", default="digits")
    i.add_argument("--batch-size", type=int, default=256)
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_infer)
    e = sub.add_parser("export", help="export a model or .mnet file to ONNX or torch.export")
    e.add_argument("model", help="a .mnet file, zoo:NAME or module.path:factory")
    e.add_argument("--out", required=True)
    e.add_argument("--format", default="onnx", choices=["onnx", "torch.export"])
    e.add_argument("--input-shape", help="example input shape (.mnet files and zoo models know theirs)")
    e.add_argument("--dataset", default="digits")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MultinetError as exc:
        print(f"multinet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
