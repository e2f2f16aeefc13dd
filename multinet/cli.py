"""The ``multinet`` command line.

    multinet inspect zoo:resnet
    multinet inspect torchvision.models:resnet18 --input-shape 1,3,224,224
    multinet inspect mypkg.models:build --input-shape 1,3,32,32 --checkpoint weights.pt
    multinet compress zoo:resnet --ratio 0.5 --method reap

Exit codes: 0 ok, 2 bad input (the message says what), 1 internal failure.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .errors import MultinetError


def load_target(target: str, checkpoint: str | None, dataset: str) -> torch.nn.Module:
    """``zoo:NAME`` or ``package.module:factory`` -> an nn.Module in eval mode."""
    if ":" not in target:
        raise MultinetError(f"model {target!r} must be zoo:NAME or module.path:factory")
    module_name, factory_name = target.split(":", 1)
    if module_name == "zoo":
        from . import zoo

        if checkpoint:
            return _with_checkpoint(zoo.build(factory_name, dataset), checkpoint)
        return zoo.create(factory_name, dataset)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MultinetError(f"cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise MultinetError(f"{module_name!r} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise MultinetError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return _with_checkpoint(model, checkpoint) if checkpoint else model.eval()


def _with_checkpoint(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise MultinetError(f"checkpoint {path!r} does not exist") from None
    except Exception as exc:
        raise MultinetError(f"checkpoint {path!r} cannot be read as tensors: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise MultinetError(f"checkpoint {path!r} does not fit {type(model).__name__}: "
                            f"{str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()}") from exc
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise MultinetError(f"--input-shape {text!r} must be integers separated by commas, e.g. 1,3,32,32") from None
    if not shape or min(shape) <= 0:
        raise MultinetError(f"--input-shape {text!r} must be positive")
    return shape


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import zoo
    from .graph import count, trace
    from .report_tables import groups_table, print_table

    model = load_target(args.model, args.checkpoint, args.dataset)
    if args.input_shape:
        example = torch.zeros(parse_shape(args.input_shape))
    elif args.model.startswith("zoo:"):
        example = zoo.example_input(args.dataset, batch=1)
    else:
        raise MultinetError("--input-shape is required for a module:factory model (e.g. --input-shape 1,3,32,32)")
    graph = trace(model, example)
    counts = count(graph.module)
    print_table(groups_table(graph, title=f"{args.model}  input {tuple(example.shape)}"))
    if args.layers:
        from .report_tables import layers_table

        print_table(layers_table(counts))
    if args.evaluate:
        if not args.model.startswith("zoo:"):
            raise MultinetError("--evaluate needs a zoo model (its dataset is built in)")
        from . import data

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

    from . import data
    from .compress import compress
    from .report_tables import compress_table, print_table

    if not 0 <= args.ratio < 1:
        raise MultinetError(f"--ratio must lie in [0, 1), got {args.ratio}")
    if args.calibration < 1:
        raise MultinetError("--calibration must be at least 1 sample")
    model = load_target(args.model, args.checkpoint, args.dataset)
    split = data.load(args.dataset)
    calib = split.train_x[: args.calibration]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(model, calib, ratio=args.ratio, method=args.method, max_positions=args.max_positions,
                          seed=args.seed, progress=sys.stderr.isatty() and not args.quiet)
    before = data.accuracy(model, split.test_x, split.test_y)
    after = data.accuracy(result.model, split.test_x, split.test_y)
    print_table(compress_table(result, title=f"{args.model}: {args.method}, {args.ratio:.0%} of every prunable group"))
    print(f"FLOPs (MACs) {result.flops_before:,} -> {result.flops_after:,} "
          f"({result.flops_after / result.flops_before:.1%} kept); params {result.params_before:,} -> "
          f"{result.params_after:,}")
    print(f"test accuracy on {args.dataset} ({len(split.test_y)} held-out images, no fine-tuning): "
          f"{before:.4f} -> {after:.4f}")
    for w in {str(w.message) for w in caught if "calibration rows" in str(w.message)}:
        print(f"note: {w}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multinet", description="Compress and merge PyTorch models without retraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="trace a model and list its channel groups, FLOPs and params")
    p.add_argument("model", help="zoo:NAME or module.path:factory")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32 (zoo models know theirs)")
    p.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    p.add_argument("--dataset", default="digits", help="zoo models: which dataset's size and weights (digits, mnist)")
    p.add_argument("--layers", action="store_true", help="also list FLOPs and params per layer")
    p.add_argument("--evaluate", action="store_true", help="zoo models: measure test accuracy on the built-in data")
    p.set_defaults(func=cmd_inspect)
    c = sub.add_parser("compress", help="compress a model on built-in data without retraining")
    c.add_argument("model", help="zoo:NAME or module.path:factory (taking the dataset's images)")
    c.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed from every prunable group")
    c.add_argument("--method", default="reap", choices=["reap", "magnitude", "magnitude+ls", "random"])
    c.add_argument("--dataset", default="digits", help="built-in data for calibration and evaluation (digits, mnist)")
    c.add_argument("--calibration", type=int, default=1024, help="calibration samples from the training split")
    c.add_argument("--max-positions", type=int, default=64, help="conv output positions sampled per image")
    c.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)
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
