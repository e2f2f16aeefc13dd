"""One worker's share of a cached-input run: its calibration batches and both models' frontier.

The sequential pipeline (sequential.py) is data-parallel over shards: each shard holds a slice of
the calibration batches (sent once), a full-width copy of the model compressed so far and of the
original, and the activations of both at the frontier. Per group it runs the segment and returns
*partial* Gram and cross sums; the driver adds them, solves, and sends back only the consumers' new
weights. In-process there is one shard (no copies beyond the two models); on Ray each shard is an
actor. Batches keep their global index, so the positions BatchGrams samples — and therefore the
statistics — do not depend on how the batches were split.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches as batch_ops
from ..errors import MultinetError
from ..calib.frontier import ActivationStore, GraphRunner, KeptValues, frontier_budget, model_outputs
from ..calib.unfold import output_grid
from ..schedule.oneshot import output_parts, real_tokens
from ..calib.stats import BatchGrams, ConsumerSpec, ConsumerStats, SampledRows
from .consumer_weights import consumer_weight, output_major, transposed, weight_matrix


@dataclass(frozen=True, eq=False)  # compared by identity: its spec is not hashable
class OriginalRead:
    """A value of the original model that one group's statistics read: the input of one consumer
    call (``kind`` "in", ``node`` the call) or a stream writer's stream (``kind`` "out", ``node`` the
    stream's value), for the group whose statistics are seeded with ``seed``."""

    kind: str
    node: str
    spec: ConsumerSpec
    call: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.node}:{self.spec.name}:{self.call}@{self.seed}"


def original_reads(specs: list[ConsumerSpec], seed: int, position: Mapping[str, int],
                   streams: bool = True) -> list[OriginalRead]:
    """What the statistics of ``specs`` (seeded with ``seed``) read from the original model: every
    consumer call's input (calls numbered in execution order, as the statistics number them) and,
    with ``streams``, each stream writer's stream."""
    reads = []
    for spec in specs:
        for call, node in enumerate(sorted(spec.nodes, key=position.__getitem__)):
            reads.append(OriginalRead("in", node, spec, call, seed))
        if streams and spec.stream is not None:
            reads.append(OriginalRead("out", spec.stream, spec, 0, seed))
    return reads


def dense_target(reference: fx.GraphModule, name: str) -> torch.Tensor | None:
    """The original consumer's weights with its bias row last (m+1 x d), where X^T (X_ref - X) W_ref
    costs less than X^T X_ref (2 d < m + 1: a 3x3 conv, a Linear that narrows); None elsewhere, and
    for a grouped conv, whose weight is not the m x d matrix the rows multiply."""
    weight, bias, is_module = consumer_weight(reference, name)
    module = reference.get_submodule(name) if is_module else None
    if weight.ndim > 2 and (module is None or module.groups != 1):  # a functional conv's groups are not known here
        return None
    is_transposed = transposed(reference, name)
    as_conv = output_major(weight, is_transposed)
    if 2 * as_conv.shape[0] >= as_conv[0].numel() + 1:
        return None
    return weight_matrix(weight, bias, dtype=None, device=None, is_transposed=is_transposed)  # where the reference is


def _run_as_is_or_copied(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself where running it cannot change it (every module in eval mode, every tensor on
    ``device``: nothing moves, no BatchNorm statistics update), else an eval-mode copy on ``device``.
    The original model is only ever read; a copy of a large model costs as much as a few batches."""
    target = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    if not any(m.training for m in model.modules()) and all(t.device == target for t in tensors):
        return model
    return copy.deepcopy(model).to(device).eval()


class FrontierShard:
    """Batches ``first_batch ..`` of the calibration set with both models' activations at the frontier."""

    def __init__(self, model: fx.GraphModule | bytes, batches: list, first_batch: int, *, max_positions: int | None,
                 device: str, memory_limit: int | str | None = None, store_dtype: torch.dtype | None = None,
                 spill_dir=None, shards: int = 1, work: fx.GraphModule | None = None):
        """``work``: the compressed model to run, shared with an in-process driver (its solves then
        reach this shard without a copy); by default a copy of ``model``."""
        if isinstance(model, (bytes, bytearray)):  # on a worker: the model travels as checked model bytes
            from ..io import from_bytes

            model = from_bytes(model)
            if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                device = "cpu"
        self.device, self.max_positions, self.first = device, max_positions, first_batch
        self.work = work if work is not None else copy.deepcopy(model).to(device).eval()
        self.reference = _run_as_is_or_copied(model, device)
        self.cur, self.ref = GraphRunner(self.work), GraphRunner(self.reference)
        self.batches = batches
        memory = frontier_budget(memory_limit, shards)  # one budget for all three stores, decided where they live
        self.cur_store = ActivationStore(memory, store_dtype, spill_dir)
        self.ref_store = ActivationStore(memory, store_dtype, spill_dir)
        # values of the original model that its frontier has passed and later groups read (see statistics)
        self.ref_kept = KeptValues(ActivationStore(memory, store_dtype, spill_dir))
        names = [p.name for p in self.cur.placeholders]
        self.masks = [batch_ops.padding_mask(batch_ops.to_device(b, device), names) for b in batches]
        for i, batch in enumerate(batches):
            self.cur_store.put(i, self.cur.start(batch_ops.to_device(batch, device)))
            self.ref_store.put(i, self.ref.start(batch_ops.to_device(batch, device)))
        self.position = 0  # the compressed model's frontier is at this node
        self.ref_position = 0  # the original's: it only moves forward
        self.node_batches = {"compressed": 0, "original": 0}  # nodes run, summed over batches
        self.seconds = {"forward": 0.0, "statistics": 0.0}
        self._targets: dict[str, torch.Tensor | None] = {}

    def samples(self) -> int:
        return sum(batch_ops.size(b) for b in self.batches)

    def statistics(self, specs: list[ConsumerSpec], cut: int, last: int, next_cut: int, seed: int,
                   on_batch: Callable[[int, int], None] | None = None,
                   ahead: list[tuple[list[ConsumerSpec], int]] = ()) -> dict[str, tuple]:
        """Partial Gram and cross sums of the consumers ``specs`` (called at nodes up to ``last``)
        over this shard's batches; afterwards the compressed model's frontier is at ``cut``.
        ``ahead`` = (specs, seed) of the groups still to come: the original model never changes, so its
        frontier only moves forward, and what it passes on the way that those groups will read (their
        consumers' inputs, their streams' values) is kept for them, as the rows their statistics will
        sample where those are smaller. ``on_batch(done, samples)`` after each batch."""
        nodes = {n: s.name for s in specs for n in s.nodes}
        by_name = {s.name: s for s in specs}
        acc: dict[str, ConsumerStats] = {}
        streams = {s.stream for s in specs if s.stream is not None}  # residual streams the writers add to
        reads = original_reads(specs, seed, self.cur.position)
        later = [r for group_specs, group_seed in ahead
                 for r in original_reads(group_specs, group_seed, self.cur.position)]
        samples = 0
        # past ``cut`` the compressed model runs only for the consumers' inputs and the streams' values:
        # what it computes there is thrown away (the solve changes it), so the layers themselves need not run
        needed = self.cur.required(cut, last + 1, nodes, streams)
        for b in range(len(self.batches)):
            captured: dict[str, list] = {}
            watch = {n: (lambda x, name=name: captured.setdefault(name, []).append(x)) for n, name in nodes.items()}
            values: dict[str, torch.Tensor] = {}
            taps = {n: (lambda v, n=n: values.setdefault(n, v)) for n in streams}
            start = time.perf_counter()
            snapshot = self._run(self.cur, self.cur_store.get(b), self.position, cut, watch, taps)
            self._run(self.cur, snapshot, cut, last + 1, watch, taps, only=needed)
            original = self._original(b, reads, last, later)
            self.seconds["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            self._accumulate(acc, by_name, captured, original, b, seed, values)
            self.seconds["statistics"] += time.perf_counter() - start
            if cut > self.position:  # the frontier moved: store it (unchanged, a spilled one is not written again)
                self.cur_store.put(b, snapshot)
            samples += batch_ops.size(self.batches[b])
            if on_batch is not None:
                on_batch(b + 1, samples)
        self.position = cut
        self.ref_position = max(self.ref_position, last + 1)
        return {name: s.as_tuple() for name, s in acc.items()}

    def _grams(self, seed: int, b: int) -> BatchGrams:
        """Batch ``b``'s statistics seeded as a group seeded with ``seed`` seeds them: the global batch
        index, so the sampled positions do not depend on how the batches were split."""
        return BatchGrams(self.max_positions, seed * 1_000_003 + (self.first + b) * 101, mask=self.masks[b])

    def _kept_form(self, read: OriginalRead, value: torch.Tensor, b: int) -> tuple[str, torch.Tensor]:
        """What to keep of ``value`` for ``read``: the rows its group's statistics will sample
        ("rows") where they are smaller than the value, else the value itself ("value"). A conv samples
        ``max_positions`` of its output positions, and so does a Linear reading an image grid channels-last
        (ConvNeXt's pointwise layers: 64 of 3,136 positions at 224²); a token sequence keeps every token."""
        if not self.max_positions or read.spec.kind not in ("conv", "linear"):
            return "value", value
        if read.spec.kind == "linear" and (value.ndim < 4 or self.masks[b] is not None):
            return "value", value
        if read.spec.kind == "conv":  # the rows' size is known before they are built
            if read.kind == "in":
                per_sample = math.prod(output_grid(value, read.spec.geometry))
                columns = value.shape[1] * math.prod(read.spec.geometry["kernel"]) + 1
            else:
                per_sample, columns = value[0, 0].numel(), value.shape[1]
            if value.shape[0] * min(per_sample, self.max_positions) * columns >= value.numel():
                return "value", value
        grams = self._grams(read.seed, b)
        rows = (grams.input_rows(read.spec, value, read.call) if read.kind == "in"
                else grams.output_rows(read.spec, value, read.call))
        return ("rows", rows) if rows.numel() < value.numel() else ("value", value)

    def _original(self, b: int, reads: list[OriginalRead], last: int, later: list[OriginalRead]
                  ) -> dict[OriginalRead, torch.Tensor | SampledRows]:
        """The original model's values that ``reads`` need for batch ``b``: kept from an earlier run
        ahead, or by moving its frontier on to ``last`` (keeping on the way what ``later`` reads)."""
        kept = self.ref_kept.keys(b)
        fresh: dict[str, Any] = {}  # kept on the way for later groups: stored once the run is over

        def lookup(read: OriginalRead):
            if "rows|" + read.key in kept:
                return SampledRows(self.ref_kept.get(b, "rows|" + read.key))
            return self.ref_kept.get(b, "value|" + read.key)

        def known(read: OriginalRead) -> bool:
            return "rows|" + read.key in kept or "value|" + read.key in kept

        got = {r: v for r in reads if (v := lookup(r)) is not None}
        wanted: dict[str, list[tuple[OriginalRead, bool]]] = {}  # node -> (read, for this group?)
        for r in reads:
            if r not in got:
                wanted.setdefault(r.node, []).append((r, True))
        for r in later:
            if not known(r):
                wanted.setdefault(r.node, []).append((r, False))

        def hear(node: str, kind: str):
            def take(x):
                for read, now in wanted[node]:
                    if read.kind != kind:
                        continue
                    if now:
                        got.setdefault(read, x)
                    elif not known(read):
                        form, value = self._kept_form(read, x, b)
                        fresh[f"{form}|{read.key}"] = value
                        kept.add(f"{form}|{read.key}")
            return take

        env = self.ref_store.get(b)
        if last + 1 > self.ref_position:
            watch = {n: hear(n, "in") for n, rs in wanted.items() if any(r.kind == "in" for r, _ in rs)
                     and self.ref.position[n] >= self.ref_position}
            taps = {n: hear(n, "out") for n, rs in wanted.items() if any(r.kind == "out" for r, _ in rs)}
            env = self._run(self.ref, env, self.ref_position, last + 1, watch, taps, True)
            self.ref_store.put(b, env)
        for r in reads:
            if r not in got and r.kind == "out" and r.node in env:  # computed before and still live at the frontier
                got[r] = env[r.node]
        missing = sorted({r.node for r in reads if r not in got})
        if missing:
            raise MultinetError(f"the original model's values at {missing} were passed without being kept "
                                f"(an internal error: they were not announced as read later)")
        keep = {f"{form}|{r.key}" for r in later for form in ("rows", "value")}
        self.ref_kept.drop(b, kept - keep)  # this group's values: deleted, the others' left as they are
        for key, value in fresh.items():
            if key in keep:
                self.ref_kept.add(b, key, value)
        return got

    def _accumulate(self, acc, specs, captured, original, b: int, seed: int, values) -> None:
        grams = self._grams(seed, b)
        ref_in = {(r.spec.name, r.call): v for r, v in original.items() if r.kind == "in"}
        ref_out = {r.spec.name: v for r, v in original.items() if r.kind == "out"}
        for name, inputs in captured.items():
            for call, x in enumerate(inputs):
                spec = specs[name]
                part = grams.stats(name, spec, x, call, spec, ref_in[(name, call)], self._target(spec))
                part.gram = part.gram.cpu()
                part.cross = part.cross.cpu() if part.cross is not None else None
                part.delta_cross = part.delta_cross.cpu() if part.delta_cross is not None else None
                if spec.stream is not None:
                    part.drift = grams.drift(name, spec, x, call, ref_out[name], values[spec.stream]).cpu()
                if name in acc:
                    acc[name].add(part)
                else:
                    acc[name] = part.owned()

    def _target(self, spec: ConsumerSpec) -> torch.Tensor | None:
        if spec.name not in self._targets:
            self._targets[spec.name] = dense_target(self.reference, spec.name)
        return self._targets[spec.name]

    def _run(self, runner: GraphRunner, env, start: int, stop: int, watch, taps=None, reference: bool = False,
             only: set[str] | None = None):
        if stop <= start:
            return env
        ran = sum(1 for i in range(start, stop) if runner.nodes[i].op != "placeholder"
                  and (only is None or runner.nodes[i].name in only))
        self.node_batches["original" if reference else "compressed"] += ran
        with torch.no_grad():
            return runner.run(env, start, stop, watch, taps, only)

    def advance(self, cut: int, next_cut: int) -> None:
        """After a solve: the compressed model's frontier runs from ``cut`` (unchanged by the solve)
        to ``next_cut`` with the new weights; the original's is already there."""
        start = time.perf_counter()
        for b in range(len(self.batches)):
            self.cur_store.put(b, self._run(self.cur, self.cur_store.get(b), cut, next_cut, {}))
        self.seconds["forward"] += time.perf_counter() - start
        self.position = next_cut

    def final_outputs(self) -> list[list[torch.Tensor]] | None:
        """Per batch, the compressed model's outputs as ``output_parts`` (padding zeroed), where its
        frontier has reached the end of the model (after the last group: no pass needed to measure the
        result); None where it has not, or where the frontier is stored in half precision."""
        if self.position != self.cur.end or self.cur_store.dtype is not None:
            return None
        outputs = []
        for b in range(len(self.batches)):
            out = model_outputs(self.cur, self.cur_store.get(b))
            outputs.append([t.cpu() for t in output_parts(real_tokens(out, self.masks[b]))])
        return outputs

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """New consumer weights (``layer.weight``, ``layer.bias`` or a functional weight's name)."""
        for key, value in tensors.items():
            owner_name, _, attr = key.rpartition(".")
            owner = self.work.get_submodule(owner_name) if owner_name else self.work
            current = getattr(owner, attr, None)
            value = value.to(self.device)
            if isinstance(current, torch.Tensor):
                current.data = value
            else:  # a bias the solve added to a layer that had none
                setattr(owner, attr, nn.Parameter(value))

    def restart(self, tensors: dict[str, torch.Tensor]) -> None:
        """Resume a killed run: the compressed model's parameters after its last finished group;
        both frontiers are still at the inputs."""
        self.load(tensors)

    def report(self) -> dict:
        return {"node_batches": dict(self.node_batches), "seconds": dict(self.seconds),
                "spilled": self.cur_store.spilled + self.ref_store.spilled + self.ref_kept.spilled}

    def close(self) -> None:
        self.cur_store.close()
        self.ref_store.close()
        self.ref_kept.close()
