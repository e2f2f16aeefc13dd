"""The ``multinet`` command line.

    multinet inspect zoo:resnet
    multinet inspect torchvision.models:resnet18 --input-shape 1,3,224,224
    multinet inspect mypkg.models:build --input-shape 1,3,32,32 --checkpoint weights.pt
    multinet compress zoo:resnet --ratio 0.5 --method reap
    multinet compress zoo:resnet --flops 0.4 --schedule auto --plan-out plan.json
    multinet compress model.py:build --model-arg width=32 --checkpoint weights.pt --data data.npz --ratio 0.5
    multinet run scenarios/quickstart.yaml --out runs/quickstart [--resume] [--set data.calibration=512]
    multinet report runs/quickstart
    multinet infer runs/quickstart/resnet.mnet --dataset digits

Exit codes: 0 ok; 2 bad input or Ctrl-C (one line on stderr, ``multinet: error: ...``, and no
half-written file); 1 internal failure (one line; ``--traceback`` or ``MULTINET_TRACEBACK=1`` shows it).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from .options import RunOptions
from .errors import InputShapeError, MultinetError
from .io.files import check_output_path
from .io.modelfile import recorded_input_shapes
from .io.sources import load_target
from .runtime.devices import default_threads, resolve_device, set_threads

SAVE_FORMATS = {".mnet": "mnet", ".onnx": "onnx", ".pt2": "torch.export"}  # --save suffix -> what is written
DEVICE_HELP = "where the work runs (calibration, solves, evaluation, latency): cpu, cuda, cuda:N"


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

    shapes = recorded_input_shapes(model)
    if args.input_shape:
        return torch.zeros(parse_shape(args.input_shape))
    if shapes:
        return torch.zeros((1, *shapes[0][1:]))
    if getattr(args, "data", None):
        return data_from(args).train_x[:1]
    if args.model.startswith("zoo:"):
        return zoo.example_input(zoo_dataset(args), batch=1)
    raise MultinetError("--input-shape is required for a module:factory model (e.g. --input-shape 1,3,32,32), "
                        "or --data to take it from the data")


def check_fits(model: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    """Refuse data of the wrong shape before any work, naming both shapes when the model recorded its
    own (a .mnet file does): otherwise it surfaces as a matrix-size error deep inside the model."""
    from .io.user_data import check_fit

    given = tuple(x.shape[1:])
    shapes = recorded_input_shapes(model)
    if shapes and tuple(shapes[0][1:]) != given:
        raise InputShapeError(f"{what} are {_shape(given)} per sample, but the model expects "
                              f"{_shape(tuple(shapes[0][1:]))}")
    check_fit(model, x, None, what)  # models that record no shape: two samples through them


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape) or "scalars"


def check_save_path(path: str) -> str:
    """The format ``--save`` writes, from its suffix (refusing others); ONNX's packages are checked now."""
    check_output_path(path, "--save", tuple(SAVE_FORMATS))
    kind = SAVE_FORMATS[os.path.splitext(path)[1].lower()]
    if kind == "onnx":
        from .io.export import require_onnx

        require_onnx()
    return kind


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def settle_runtime(args: argparse.Namespace) -> None:
    """Device and threads, checked and set before any work, so ``--device cuda`` on a machine without a
    GPU fails in a second, not after loading data."""
    if getattr(args, "device", None) is not None:
        args.device = str(resolve_device(args.device))
    if hasattr(args, "threads"):
        set_threads(args.threads)


def zoo_dataset(args: argparse.Namespace) -> str:
    """--data digits|mnist also sizes a zoo model (and picks its weights); otherwise --dataset does."""
    from .io.data import DATASETS

    return args.data if getattr(args, "data", None) in DATASETS else args.dataset


def model_from(args: argparse.Namespace) -> torch.nn.Module:
    """The model argument with --checkpoint and --model-arg (factory keyword arguments)."""
    from .io.sources import parse_model_args

    return load_target(args.model, getattr(args, "checkpoint", None), zoo_dataset(args),
                       args=parse_model_args(getattr(args, "model_arg", [])))


def data_from(args: argparse.Namespace):
    """--data (with --eval-data and the image options) or the built-in --dataset, read once per command."""
    if getattr(args, "_split", None) is None:
        from .io.images import ImageOptions
        from .io.user_data import load_data

        if getattr(args, "eval_data", None) and not args.data:
            raise MultinetError("--eval-data needs --data (the calibration data)")
        images = ImageOptions.parse(getattr(args, "image_size", None), getattr(args, "channels", None),
                                    getattr(args, "mean", None), getattr(args, "std", None))
        args._split = load_data(getattr(args, "data", None) or args.dataset, eval_spec=getattr(args, "eval_data", None),
                                images=images)
    return args._split


def data_name(args: argparse.Namespace) -> str:
    """What the evaluation data is called in messages: the evaluation source, else the data source."""
    return getattr(args, "eval_data", None) or getattr(args, "data", None) or args.dataset


def evaluation_line(model: torch.nn.Module, compressed: torch.nn.Module, split, name: str,
                    device: str = "cpu") -> str:
    """Accuracy before -> after on labelled evaluation data; without labels, agreement with the original.
    Both models run on ``device``, like the rest of the job."""
    from .io import data
    from .runtime.infer import infer

    n = len(split.test_x)
    held_out = f"{n} held-out {'images' if name in data.DATASETS else 'samples'}, no fine-tuning"
    reference = infer(model, split.test_x, batch_size=512, device=device)
    outputs = infer(compressed, split.test_x, batch_size=512, device=device)
    if split.test_y is not None:
        before, after = data.accuracy_of(reference, split.test_y), data.accuracy_of(outputs, split.test_y)
        return f"test accuracy on {name} ({held_out}): {before:.4f} -> {after:.4f}"
    return (f"no labels in {name}: agreement with the original model ({held_out}): top-1 "
            f"{data.agreement_of(outputs, reference):.4f}, relative output error "
            f"{data.relative_error(outputs, reference):.5f}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph import count, trace
    from .scenario.tables import groups_table, print_table

    model = model_from(args)
    example = example_for(model, args)
    graph = trace(model, example)
    counts = count(graph.module)
    print_table(groups_table(graph, title=f"{args.model}  input {tuple(example.shape)}"))
    if args.layers:
        from .scenario.tables import layers_table

        print_table(layers_table(counts))
    if args.evaluate:
        if not args.model.startswith("zoo:") and not args.data:
            raise MultinetError("--evaluate needs --data with labels, or a zoo model (its dataset is built in)")
        from .io import data
        from .io.user_data import check_fit

        split = data_from(args)
        if split.test_y is None:
            raise MultinetError(f"--evaluate needs labels, and {data_name(args)} has none")
        check_fit(graph.module, split.test_x, split.test_y, f"the {data_name(args)} inputs")
        acc = data.accuracy(graph.module, split.test_x, split.test_y)
        unit = "images" if data_name(args) in data.DATASETS else "samples"
        print(f"test accuracy on {data_name(args)} ({len(split.test_y)} held-out {unit}): {acc:.4f}")
    prunable = graph.prunable_groups
    print(f"{len(graph.groups)} groups, {len(prunable)} prunable "
          f"({sum(g.size for g in prunable)} of {sum(g.size for g in graph.groups)} channels); "
          f"FLOPs (MACs) {counts.flops:,}  params {counts.params:,}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model on built-in or the user's data; report groups, FLOPs and accuracy (or, without labels,
    agreement with the original) before -> after."""
    import warnings

    from .io import data
    from .scenario.tables import compress_table, print_table

    budget = _budget(args)
    if args.ratio is not None and (budget is not None or args.plan):
        raise MultinetError("give --ratio, a budget (--flops/--params/--latency-ms) or --plan, not several")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise MultinetError(f"--ratio must lie in [0, 1), got {args.ratio}")
    if args.calibration < 1:
        raise MultinetError("--calibration must be at least 1 sample")
    if args.skip_links and (args.flops is None and args.params is None):
        raise MultinetError("--skip-links needs a --flops or --params budget (the search compares the model with and "
                            "without skip links at the same cost)")
    if args.skip_links and args.plan_out:
        raise MultinetError("--skip-links with --plan-out: the plan applies to the graph with the skip links, not to "
                            "the model, so it cannot be re-applied; use --save to keep the compressed model")
    save_kind = _check_compress_outputs(args)
    plan = None
    if args.plan:
        from .schedule import Plan

        plan = Plan.load(args.plan)
    from .io.user_data import check_fit

    model = model_from(args)
    extra = {"skip_links": True} if args.skip_links else {}
    if args.submodule:
        from .unification import MultiNet

        if isinstance(model, MultiNet):
            raise MultinetError("--submodule compresses part of one model, not of a saved MultiNet")
        extra["submodule"] = args.submodule
    split = data_from(args)
    calib = split.train_x[: args.calibration]
    check_fits(model, calib, f"the {args.data or args.dataset} inputs")
    check_fit(model, split.test_x, split.test_y, f"the {data_name(args)} inputs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compressor(model)(model, calib, ratio=args.ratio, method=args.method, budget=budget,
                                    schedule=args.schedule, plan=plan, plan_path=args.plan_out,
                                    max_positions=args.max_positions, seed=args.seed, device=args.device,
                                    progress=not args.quiet, **extra)
    whole = result.whole_model if args.submodule else result.model
    evaluation = evaluation_line(model, whole, split, data_name(args), args.device)
    if result.plan is not None:
        p = result.plan
        how = f"{p.schedule} schedule, {p.metric} budget"
    else:
        how = f"{args.method}, {0.5 if args.ratio is None else args.ratio:.0%} of every prunable group"
    if args.submodule:
        how += f", submodule `{args.submodule}` only (FLOPs and params below are its own)"
    print_table(compress_table(result, title=f"{args.model}: {how}"))
    print(f"FLOPs (MACs) {result.flops_before:,} -> {result.flops_after:,} "
          f"({result.flops_after / result.flops_before:.1%} kept); params {result.params_before:,} -> "
          f"{result.params_after:,}")
    print(evaluation)
    for layer, source in result.skip_links:
        print(f"skip link: {layer} reads the input of {source}")
    if not result.skip_links:
        for producers in result.removed_whole:
            print(f"removed whole: {', '.join(producers)} (no channel of its group is left)")
    if result.plan is not None:
        p = result.plan
        unit = "ms" if p.metric == "latency" else p.metric
        print(f"budget: {p.metric} <= {p.target:,.3f} {unit} (original {p.original:,.3f}); achieved "
              f"{p.measured_cost:,.3f}; final-output error predicted {p.predicted_error:.5f}, measured "
              f"{p.measured_error:.5f}; scheduling took {sum(p.seconds.values()):.1f} s")
        if p.compared:
            errors = ", ".join(f"{k} {v:.5f}" for k, v in p.compared.items())
            print(f"the predicted error was too large to rank plans by: the {' and '.join(p.compared)} plans were both applied "
                  f"(measured errors {errors}); the {p.schedule} plan kept")
        if args.plan_out:
            print(f"plan written to {args.plan_out}")
    _write_removed(result, args)
    example = calib[:1]
    if args.submodule:  # the compressed submodule is what is saved: its own input is the example
        from .pipeline.submodule import submodule_inputs

        example = submodule_inputs(model, args.submodule, calib[:1], 1)[0]
    _save_result(result, args, save_kind, example)
    shown = ("calibration rows", "budget", "stay whole")  # what a user should read: not every library warning
    for w in {str(w.message) for w in caught if any(s in str(w.message) for s in shown)}:
        print(f"note: {w}", file=sys.stderr)
    return 0


def _compressor(model: torch.nn.Module):
    """multinet.compress, or for a saved MultiNet its compression that keeps the type (members, links)."""
    from .pipeline.compression import compress
    from .unification import MultiNet, compress_multinet

    return compress_multinet if isinstance(model, MultiNet) else compress


def _check_compress_outputs(args: argparse.Namespace) -> str | None:
    """Every file compress will write, checked before any work; returns what --save writes."""
    if args.plan_out:
        check_output_path(args.plan_out, "--plan-out")
    if args.removed_out:
        check_output_path(args.removed_out, "--removed-out")
    return check_save_path(args.save) if args.save else None


def _save_result(result, args: argparse.Namespace, kind: str | None, example: torch.Tensor) -> None:
    """Write the compressed model as --save's suffix says, or say that it was not kept."""
    if not args.save:
        print(f"model not saved (add --save FILE{'|FILE'.join(SAVE_FORMATS)} to keep it)")
        return
    if kind == "mnet":
        from .io import save

        where = (f" (load with multinet.load and put it in place of the model's `{args.submodule}`)"
                 if args.submodule else " (load with multinet.load)")
        print(f"{'submodule' if args.submodule else 'model'} written to {save(result.model, args.save, example)}{where}")
        return
    from .io import export

    print(f"model written to {export(result.model, example, args.save, format=kind)} ({kind}, dynamic batch)")


def _write_removed(result, args: argparse.Namespace) -> None:
    """--removed-out: which channels each group lost, as JSON for a pipeline."""
    if not args.removed_out:
        return
    import json

    from .io.files import write_atomic

    groups = ",\n  ".join(json.dumps(g) for g in result.removed_channels())  # one group per line
    head = json.dumps({"model": args.model, "method": result.method})[:-1]
    write_atomic(args.removed_out, f'{head}, "groups": [\n  {groups}\n]}}\n')
    print(f"removed channels written to {args.removed_out}")


def _budget(args: argparse.Namespace):
    """A Budget from the command line flags, or None when none is given."""
    if args.flops is None and args.params is None and args.latency_ms is None:
        if (args.round_to != 1 or args.ignore or args.min_channels is not None or args.plan_out
                or args.residual_branches):
            raise MultinetError("--round-to, --ignore, --min-channels, --residual-branches and --plan-out need a "
                                "budget (--flops, --params or --latency-ms)")
        return None
    from .schedule import Budget

    return Budget(flops=args.flops, params=args.params, latency_ms=args.latency_ms, device=args.device,
                  latency_batch=args.latency_batch, round_to=args.round_to, ignore=tuple(args.ignore),
                  min_channels=args.min_channels, residual_streams=not args.keep_residual,
                  residual_branches=args.residual_branches)


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
        report = run(scenario, out, resume=args.resume, progress=not args.quiet, log=log)
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
    """Batch inference of a model (or a saved MultiNet) on a built-in dataset's test split or all of --data."""
    import time

    from .io import data
    from .runtime.infer import infer

    model = model_from(args)
    x, y, what = inference_data(args)
    check_fits(model, x, f"the {what}")
    start = time.perf_counter()
    fuse = {"yes": True, "no": False, "auto": "auto", "batched": "batched"}[args.fuse]
    overlap = {"yes": True, "no": False, "auto": "auto"}[args.overlap]
    outputs = infer(model, x, batch_size=args.batch_size, device=args.device, progress=not args.quiet, fuse=fuse,
                    overlap=overlap)
    seconds = time.perf_counter() - start
    outputs = outputs if isinstance(outputs, dict) else {"output": outputs}
    for name, out in outputs.items():
        if y is None:
            print(f"{name}: outputs of shape {tuple(out.shape)} for the {what} (no labels, no accuracy)")
        else:
            print(f"{name}: accuracy {data.accuracy_of(out, y):.4f} on {len(y)} {what}")
    print(f"{len(x) / seconds:,.0f} images/s (batch {args.batch_size}, {args.device})")
    return 0


def inference_data(args: argparse.Namespace):
    """(inputs, labels or None, what they are): a built-in set's test split, or all of --data."""
    from .io import data
    from .io.images import ImageOptions
    from .io.user_data import check_image_options, read

    source = args.data or args.dataset
    images = ImageOptions.parse(args.image_size, args.channels, args.mean, args.std)
    check_image_options(images, source)
    if source in data.DATASETS:
        split = data.load(source)
        return split.test_x, split.test_y, f"{source} test images"
    x, y = read(source, images=images)
    return x, y, f"samples of {source}"


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model (a .mnet file, zoo or factory model) to ONNX or torch.export."""
    from .io import export

    check_output_path(args.out, "--out")
    if args.format == "onnx":
        from .io.export import require_onnx

        require_onnx()
    model = model_from(args)
    print(f"written {export(model, example_for(model, args), args.out, format=args.format)}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="multinet", description="Compress and merge PyTorch models without retraining.",
                                     epilog="Exit codes: 0 ok; 2 bad input or Ctrl-C (one line on stderr); 1 internal "
                                            "failure.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"multinet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do (`multinet COMMAND --help` for its "
                                                                      "options)")
    p = sub.add_parser("inspect", help="trace a model and list its channel groups, FLOPs and params")
    p.add_argument("model", help="zoo:NAME, module.path:factory, path/to/file.py:factory or a saved .mnet file")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32 (zoo models know theirs)")
    p.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    p.add_argument("--dataset", default="digits", help="zoo models: which dataset's size and weights (digits, mnist)")
    p.add_argument("--layers", action="store_true", help="also list FLOPs and params per layer")
    p.add_argument("--evaluate", action="store_true", help="zoo models: measure test accuracy on the built-in data")
    p.set_defaults(func=cmd_inspect)
    c = sub.add_parser("compress", help="compress a model on built-in data without retraining")
    c.add_argument("model", help="zoo:NAME, module.path:factory, path/to/file.py:factory or a saved .mnet file")
    c.add_argument("--ratio", type=float, help="fraction of channels removed from every prunable group (default 0.5 "
                   "when no budget is given)")
    c.add_argument("--flops", type=float, help="budget: keep at most this fraction of the FLOPs")
    c.add_argument("--params", type=float, help="budget: keep at most this fraction of the parameters")
    c.add_argument("--latency-ms", type=float, help="budget: at most this median latency (ms per batch)")
    c.add_argument("--device", default="cpu", help=DEVICE_HELP)
    c.add_argument("--latency-batch", type=positive_int, default=1, help="batch size of the latency measurement")
    c.add_argument("--schedule", default="auto", choices=["auto", "exhaustive", "uniform"],
                   help="how a budget is shared among groups")
    c.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    c.add_argument("--ignore", action="append", default=[], help="layer name or glob whose outputs stay (repeatable)")
    c.add_argument("--min-channels", type=int, help="channels every group keeps at least (default 1)")
    c.add_argument("--keep-residual", action="store_true", help="leave residual streams whole")
    c.add_argument("--residual-branches", action="store_true", help="a residual block's branch may lose all its "
                   "channels and collapse into its skip connection (x + f(x) -> x + constant)")
    c.add_argument("--skip-links", action="store_true", help="with a --flops or --params budget: a layer may read "
                   "an earlier tensor of the model, so that the layers in between can go whole where that beats "
                   "narrowing them, or a residual branch collapse into its skip connection (kept only where it lowers the "
                   "output error; about 2.5-6x the run time)")
    c.add_argument("--submodule", metavar="PATH", help="compress only this submodule of a model that does not "
                   "trace whole (a detector's backbone), calibrated on what it receives while the model runs; --save "
                   "writes the compressed submodule, and accuracy is the whole model's with it in place")
    c.add_argument("--plan-out", help="write the schedule's plan (JSON) here")
    c.add_argument("--plan", help="apply a plan written earlier by --plan-out")
    c.add_argument("--save", help="write the compressed model here: .mnet (tensors and a graph manifest, no pickle), "
                   ".onnx or .pt2 (torch.export), both with a dynamic batch")
    c.add_argument("--removed-out", metavar="FILE.json", help="write which channels each group lost (group, producers, "
                   "removed indices, kept count) as JSON")
    c.add_argument("--method", default="reap", choices=["reap", "magnitude", "magnitude+ls", "random"],
                   help="how channels are selected (and whether the consumers are re-solved)")
    c.add_argument("--dataset", default="digits", help="built-in data for calibration and evaluation (digits, mnist)")
    c.add_argument("--calibration", type=int, default=1024, help="calibration samples from the training split")
    c.add_argument("--max-positions", type=positive_int, default=RunOptions.max_positions,
                   help="conv output positions sampled per image")
    c.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
    c.add_argument("--seed", type=int, default=0, help="seed of sampled positions and random selections")
    c.add_argument("--quiet", action="store_true", help="no progress output (a bar on a terminal, lines in a log)")
    c.set_defaults(func=cmd_compress)
    r = sub.add_parser("run", help="run a scenario YAML file")
    r.add_argument("scenario", help="the scenario YAML file (see scenarios/README.md)")
    r.add_argument("--out", help="run directory (default runs/<scenario name>, numbered when taken)")
    r.add_argument("--resume", action="store_true", help="continue a killed run after its last finished step")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set steps.0.compress.budget.flops=0.3 (repeatable)")
    r.add_argument("--quiet", action="store_true", help="no progress output (a bar on a terminal, lines in a log)")
    r.add_argument("--ray-address", help="run the jobs on a Ray cluster: 'auto' (inside `ray job submit`), host:port, "
                   "or 'local' to start one here")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="print a finished run's report and redraw its plot")
    rp.add_argument("run_dir", help="the run directory `multinet run` wrote")
    rp.add_argument("--no-plot", action="store_true", help="do not redraw report.png")
    rp.set_defaults(func=cmd_report)
    i = sub.add_parser("infer", help="batch inference of a model or saved .mnet file on built-in data")
    i.add_argument("model", help="a .mnet file, zoo:NAME, module.path:factory or path/to/file.py:factory")
    i.add_argument("--dataset", default="digits", help="built-in data whose test split is run (digits, mnist)")
    i.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    i.add_argument("--device", default="cpu", help=DEVICE_HELP)
    i.add_argument("--fuse", default="yes", choices=["yes", "no", "batched", "auto"],
                   help="a MultiNet's layers that read the same tensor as one wider layer (yes), as built (no), "
                        "fused and same-shaped layers of different members as one batched op (batched), or "
                        "whichever runs the first batch fastest here (auto)")
    i.add_argument("--overlap", default="auto", choices=["auto", "yes", "no"],
                   help="run what a MultiNet's members compute apart at the same time (CUDA streams on a GPU, "
                        "threads on a CPU): where it runs the first batch faster here (auto), always, or never")
    i.add_argument("--quiet", action="store_true", help="no progress output (a bar on a terminal, lines in a log)")
    i.set_defaults(func=cmd_infer)
    e = sub.add_parser("export", help="export a model or .mnet file to ONNX or torch.export")
    e.add_argument("model", help="a .mnet file, zoo:NAME, module.path:factory or path/to/file.py:factory")
    e.add_argument("--out", required=True, help="the file to write (e.g. model.onnx, model.pt2)")
    e.add_argument("--format", default="onnx", choices=["onnx", "torch.export"],
                   help="ONNX (needs onnx and onnxscript) or a torch.export program; both with a dynamic batch")
    e.add_argument("--input-shape", help="example input shape (.mnet files and zoo models know theirs)")
    e.add_argument("--dataset", default="digits", help="zoo models: which dataset's input size and weights")
    e.set_defaults(func=cmd_export)
    _add_common_options(sub, work=("inspect", "compress", "run", "infer", "export"))
    _add_user_options(sub)
    return parser


def _add_common_options(sub, work: tuple[str, ...]) -> None:
    """--threads on the commands that compute, --traceback on all, defaults shown in every --help."""
    for name, command in sub.choices.items():
        command.formatter_class = HelpFormatter
        if name in work:
            command.add_argument("--threads", type=positive_int, default=None,
                                 help=f"CPU threads for torch (default: the CPUs not already busy; "
                                      f"{default_threads()} now)")
        command.add_argument("--traceback", action="store_true",
                             help="on an internal error, show the Python traceback (also MULTINET_TRACEBACK=1)")


def _add_user_options(sub) -> None:
    """The user's own model (factory arguments, state dict) and data on inspect, compress, infer and export."""
    for name in ("inspect", "compress", "infer", "export"):
        command = sub.choices[name]
        command.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                             help="keyword argument of the model's factory, value read as YAML: width=32, "
                                  "weights=None (repeatable)")
        if name in ("infer", "export"):
            command.add_argument("--checkpoint", help="state_dict file (tensors only) to load into the model")
        group = command.add_argument_group("your own data (instead of --dataset)")
        group.add_argument("--data", metavar="SPEC", help="digits | mnist | a .npy/.npz/.pt file | a folder of images "
                           "(a subfolder per class gives labels) | module:function | path/to/file.py:function"
                           + ("; split 80/20 into calibration and evaluation unless --eval-data is given"
                              if name in ("inspect", "compress") else ""))
        if name in ("inspect", "compress"):
            group.add_argument("--eval-data", metavar="SPEC", help="evaluation data (same kinds); --data is then "
                               "used whole for calibration")
        group.add_argument("--image-size", metavar="N|HxW", help="folders of images: resize every image to this")
        group.add_argument("--channels", type=int, choices=[1, 3], help="folders of images: grey or RGB "
                           "(default: grey when every image is)")
        group.add_argument("--mean", metavar="M[,M,M]", help="folders of images: per-channel mean subtracted from "
                           "pixels in [0, 1]")
        group.add_argument("--std", metavar="S[,S,S]", help="folders of images: per-channel std divided by")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input and Ctrl-C: one line, exit 2; an internal failure: one line, exit 1."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _note  # a library notice is one line on the command line, not two
    try:
        settle_runtime(args)
        return args.func(args)
    except MultinetError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:  # atomic writes removed their temporary files on the way out
        return _fail("interrupted (files being written were not left half-written)", 2)
    except Exception as exc:
        if getattr(args, "traceback", False) or os.environ.get("MULTINET_TRACEBACK", "") not in ("", "0"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {str(exc).strip() or '(no message)'} "
                     f"(rerun with --traceback or MULTINET_TRACEBACK=1 to see where)", 1)


def _note(message, category, filename, lineno, line=None) -> str:
    text = " ".join(str(message).split()).removeprefix("multinet: ")
    return f"multinet: note: {text}\n"


def _fail(message: str, code: int) -> int:
    """``multinet: error: ...`` on one line of stderr (a pipeline greps for it); returns the exit code."""
    print(f"multinet: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
