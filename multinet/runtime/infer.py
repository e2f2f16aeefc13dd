"""Batch inference over a dataset: per-model outputs of a MultiNet (or the output of any model)."""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..calib import batches, iterate_batches
from ..errors import MultinetError
from .devices import resolve_device, same_device
from ..schedule.latency import synchronize
from .progress import Bar


FUSE_TRIALS = 5  # timed rounds per form when ``fuse="auto"`` chooses a MultiNet's form


def infer(net: nn.Module, data, batch_size: int = 256, device: str = "cpu", progress: bool = False,
          executor=None, fuse: bool | str = True, overlap: bool | str = "auto"):
    """Run ``net`` over ``data`` (a tensor, a list of batches or a DataLoader) in batches.

    Returns the outputs concatenated along the batch: for a MultiNet {model name: output}, for a
    plain model its output. A MultiNet runs fused (``fuse=False``: as given): layers of its members
    that read the same tensor are one wider layer, so the members run as one wide network; each such
    set of layers is timed on the first batch and fused only where the wider layer is not slower
    (``MultiNet.fused(timed_on=...)``; timed where the network's parameters are, and fused untimed
    where those are not on ``device``).
    ``fuse="batched"``: fused, and same-shaped layers of different members run as one batched or
    grouped op (``MultiNet.fused(batched=True)``). ``fuse="auto"``: whichever of those forms runs the
    first batch fastest on ``device`` (timed in turns, ``FUSE_TRIALS`` rounds each, or fewer where the
    rounds so far already fix the answer): a wider layer or a
    grouped convolution is not faster on every device and shape.
    ``overlap``: what the members compute apart runs at the same time (``MultiNet.overlapped``: CUDA
    streams on a GPU, worker threads on a CPU). ``"auto"`` (the default) times the form chosen above
    with and without it on the first batch and keeps the faster, where two members have work of their
    own (otherwise nothing is timed, and no batch is read early); ``True`` overlaps, ``False`` runs
    the network as given. The data is read once through (a batch timed on is not lost).
    The network is moved to ``device``; inputs are moved batch by batch.
    With a Ray executor the batches go through Ray Data (``map_batches`` over a pool of actors
    that each rebuild the network once from its model bytes and choose its form, fusion and overlap
    alike, on their own first batch, device and CPUs, not the driver's), in order.
    """
    if not (isinstance(fuse, bool) or fuse in ("auto", "batched")):
        raise MultinetError(f"fuse must be True, False, 'batched' or 'auto', got {fuse!r}")
    if not (isinstance(overlap, bool) or overlap == "auto"):
        raise MultinetError(f"overlap must be True, False or 'auto', got {overlap!r}")
    dev = resolve_device(device)
    stream = BatchStream(data, batch_size)
    if executor is not None and getattr(executor, "name", "local") == "ray":
        # the actors choose the form (fusion, overlap) on their own first batch, device and CPUs
        return _infer_ray(net, stream, batch_size, executor, fuse, overlap)
    net = chosen_form(net, stream.first, dev, fuse, overlap)
    net = net.to(dev).eval()
    total = batches.size(data) if isinstance(data, (torch.Tensor, Mapping)) else None
    bar = Bar(progress, total or 0, "inference")
    parts, spec = [], None
    try:
        with torch.no_grad():
            for batch in stream:
                out = batches.call(net, batches.to_device(batch, dev))
                leaves, tree = pytree.tree_flatten(out)
                if spec is None:
                    spec = tree
                    if not all(isinstance(t, torch.Tensor) for t in leaves):
                        raise MultinetError("the network returns something other than tensors; cannot collect outputs")
                parts.append([t.cpu() for t in leaves])
                bar.advance(batches.size(batch))
    finally:
        bar.close()
    joined = [torch.cat(column) for column in zip(*parts)]
    return pytree.tree_unflatten(joined, spec)


def chosen_form(net: nn.Module, first: Callable[[], Any], device: torch.device, fuse: bool | str,
                overlap: bool | str) -> nn.Module:
    """The form ``net`` runs in for ``fuse`` and ``overlap`` (see ``infer``), any timing done on the batch
    ``first()`` gives (asked for only where something is timed) and where the network's parameters are
    (on ``device``: infer's; on its own device: a Ray actor's)."""
    if fuse == "auto":
        net = faster_form(net, first(), device)
    elif fuse and _is_multinet(net):
        net = _fused(net, batched=fuse == "batched", timed_on=first(), device=device)
    if overlap is True and _is_multinet(net):
        net = net.overlapped()
    elif overlap == "auto" and _may_overlap(net):
        net = faster_overlap(net, first(), device)
    return net


def faster_form(net: nn.Module, batch, device: torch.device, trials: int = FUSE_TRIALS,
                clock=time.perf_counter) -> nn.Module:
    """A MultiNet's form (as built, fused, fused and batched) that runs ``batch`` fastest on ``device``
    (median of ``trials`` rounds, the forms taking turns after one warm-up call each); other models as
    given. A form that changes nothing is not timed twice; a batched form that cannot be built or does
    not run this batch (shapes that matched only at the recorded input size) is left out, with a warning."""
    forms = [net]
    fused = _fused(net, timed_on=batch, device=device)
    if fused is not net and not _same_graph(fused, net):  # timed fusion may have kept every set apart
        forms.append(fused)
    batched = _batched(fused)
    if batched is not None and not _same_graph(batched, forms[-1]):
        forms.append(batched)
    else:
        batched = None
    if len(forms) == 1:
        return net
    return fastest(forms, batch, device, trials, clock, optional=forms[-1] if batched is not None else None)


def faster_overlap(net: nn.Module, batch, device: torch.device, trials: int = FUSE_TRIALS,
                   clock=time.perf_counter) -> nn.Module:
    """``net`` or ``net.overlapped()``, whichever runs ``batch`` faster on ``device``; as given (nothing
    timed) for a model that is not a MultiNet, one already overlapped, or one whose members have no
    work of their own to overlap."""
    if not _may_overlap(net):
        return net
    return fastest([net, net.overlapped()], batch, device, trials, clock)


def _may_overlap(net: nn.Module) -> bool:
    return _is_multinet(net) and not net.is_overlapped and net.can_overlap()


class BatchStream:
    """The data's batches, read once through: a batch looked at early (to time forms on) comes first
    again, so a one-shot iterable (a generator) loses nothing, and a DataLoader is not read twice."""

    def __init__(self, data, batch_size: int):
        self._batches = iter(iterate_batches(data, batch_size))
        self._head: list = []

    def first(self):
        if not self._head:
            try:
                self._head.append(next(self._batches))
            except StopIteration:
                raise MultinetError("the data holds no batch to run") from None
        return self._head[0]

    def __iter__(self):
        while self._head:
            yield self._head.pop(0)
        yield from self._batches


def fastest(forms: list[nn.Module], batch, device: torch.device, trials: int, clock,
            optional: nn.Module | None = None) -> nn.Module:
    """The form with the least median time over ``trials`` rounds (the forms taking turns after one
    warm-up call each; on a tie, the later form). ``optional``: a form that may fail on this batch and
    is then left out, with a warning. The rounds stop early where the answer is already certain
    (``_decided``): a clear winner costs about half the timed calls."""
    forms = [form.to(device).eval() for form in forms]
    x = batches.to_device(batch, device)
    with torch.no_grad():
        runnable = []
        for form in forms:
            try:
                batches.call(form, x)
            except Exception as exc:  # noqa: BLE001 - only the optional batched form may fail here
                if form is not optional:
                    raise
                warnings.warn(f"the batched form does not run this batch ({type(exc).__name__}: {exc}); "
                              f"choosing between the other forms")
                continue
            runnable.append(form)
        forms = runnable
        times: list[list[float]] = [[] for _ in forms]
        for _ in range(trials):
            for form, spent in zip(forms, times):
                synchronize(device)
                start = clock()
                batches.call(form, x)
                synchronize(device)
                spent.append(clock() - start)
            if _decided(times, trials):
                break
    medians = [statistics.median(t) for t in times]
    return forms[min(range(len(forms)), key=lambda i: (medians[i], -i))]  # on a tie, the more fused form


def _decided(times: list[list[float]], trials: int) -> bool:
    """Whether the rounds so far already fix which form has the least median over ``trials`` rounds:
    after r >= trials // 2 + 1 rounds, a form whose slowest time is below every other form's fastest
    has its median below theirs whatever the remaining rounds give (its r times cover the median
    position of ``trials`` values, and the others have at most trials - r values left to go below).
    The early answer is then the one all rounds would give."""
    if len(times) < 2 or len(times[0]) < trials // 2 + 1:
        return False
    slowest = [max(t) for t in times]
    best = min(range(len(times)), key=slowest.__getitem__)
    return all(slowest[best] < min(t) for i, t in enumerate(times) if i != best)


def _is_multinet(net: nn.Module) -> bool:
    from ..unification.multinet import MultiNet

    return isinstance(net, MultiNet)


def _batched(net: nn.Module) -> nn.Module | None:
    """A fused MultiNet's batched form; None for other models, or (with a warning) if it cannot be built."""
    from ..unification.multinet import MultiNet

    if not isinstance(net, MultiNet):
        return None
    try:
        return _fused(net, batched=True)
    except Exception as exc:  # noqa: BLE001 - an optional form: the fused one still runs
        warnings.warn(f"could not build the batched form ({type(exc).__name__}: {exc}); choosing between the others")
        return None


def _same_graph(a: nn.Module, b: nn.Module) -> bool:
    """Whether two forms run the same code (e.g. batching found nothing to batch)."""
    return getattr(a, "graph_module", a).code == getattr(b, "graph_module", b).code


def _fused(net: nn.Module, batched: bool = False, timed_on=None, device: torch.device | None = None) -> nn.Module:
    """A MultiNet's fused form (same outputs up to float rounding, fewer and larger ops); others as given.
    ``timed_on``: fuse each set of sibling layers only where that is not slower on this batch, timed
    where the network's parameters are; only when those are on ``device`` (the run's), so that the
    timing is the run's and the caller's network is not moved to time it."""
    from ..unification.multinet import MultiNet

    if not isinstance(net, MultiNet):
        return net
    here = next((p.device for p in net.parameters()), torch.device("cpu"))
    timed = timed_on is not None and (device is None or same_device(here, device))
    return net.fused(batched=batched, timed_on=batches.to_device(timed_on, here) if timed else None)


def predictor_device() -> torch.device:
    """The GPU Ray gave this actor, if it gave one and CUDA works here; else the CPU.

    An actor that reserved a GPU and computed on the CPU would hold the GPU for nothing."""
    import ray

    if torch.cuda.is_available() and ray.get_gpu_ids():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the reserved GPU(s)
    return torch.device("cpu")


class _Predictor:
    """A Ray Data actor: rebuilds the network once on its device, chooses its form (fusion, overlap: the
    run-time choices the model bytes do not hold) on its first batch, then maps batches to outputs."""

    def __init__(self, blob_ref, fuse: bool | str = True, overlap: bool | str = False):
        from .executors import fetch
        from ..io import from_bytes

        self.device = predictor_device()
        self.net = from_bytes(fetch(blob_ref)).to(self.device).eval()
        self.form: tuple | None = (fuse, overlap)  # None once chosen

    def __call__(self, batch: dict) -> dict:
        x = torch.from_numpy(batch["data"]).to(self.device)
        if self.form is not None:  # timed here: this actor's device and CPUs, not the driver's
            self.net, self.form = chosen_form(self.net, lambda: x, self.device, *self.form).eval(), None
        with torch.no_grad():
            out = self.net(x)
        leaves, _ = pytree.tree_flatten(out)
        return {f"out{i}": t.cpu().numpy() for i, t in enumerate(leaves)}


def _infer_ray(net: nn.Module, stream: BatchStream, batch_size: int, executor, fuse: bool | str,
               overlap: bool | str):
    import ray

    try:
        import ray.data
    except ImportError as exc:
        raise MultinetError(f"batch inference on Ray uses Ray Data: pip install 'ray[data]' ({exc})") from None
    from ..io import to_bytes

    x = batches.concat(list(stream))
    if not isinstance(x, torch.Tensor):
        raise MultinetError("batch inference on Ray takes single-tensor inputs; run locally for tuples or dicts")
    with torch.no_grad():
        _, spec = pytree.tree_flatten(net(x[:1]))
    blob = ray.put(to_bytes(net, x[:1]))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    blocks = [c.numpy() for c in torch.chunk(x, max(1, executor.workers))]  # one block per actor to start with
    dataset = ray.data.from_numpy(blocks).map_batches(
        _Predictor, fn_constructor_args=(blob, fuse, overlap or bool(getattr(net, "is_overlapped", False))),
        batch_size=batch_size, batch_format="numpy",
        concurrency=max(1, executor.workers), num_cpus=executor.options["num_cpus"],
        num_gpus=executor.options["num_gpus"] or None)
    columns: dict[str, list] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            columns.setdefault(name, []).append(torch.from_numpy(values))
    joined = [torch.cat(columns[f"out{i}"]) for i in range(len(columns))]
    return pytree.tree_unflatten(joined, spec)
