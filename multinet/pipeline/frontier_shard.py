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
import time
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches as batch_ops
from ..calib.frontier import ActivationStore, GraphRunner
from ..calib.stats import BatchGrams, ConsumerSpec, ConsumerStats


class FrontierShard:
    """Batches ``first_batch ..`` of the calibration set with both models' activations at the frontier."""

    def __init__(self, model: fx.GraphModule | bytes, batches: list, first_batch: int, *, max_positions: int | None,
                 device: str, memory_limit: int | None = None, store_dtype: torch.dtype | None = None,
                 spill_dir=None):
        if isinstance(model, (bytes, bytearray)):  # on a worker: the model travels as checked model bytes
            from ..io import from_bytes

            model = from_bytes(model)
            if torch.device(device).type == "cuda" and not torch.cuda.is_available():
                device = "cpu"
        self.device, self.max_positions, self.first = device, max_positions, first_batch
        self.work = copy.deepcopy(model).to(device).eval()
        self.reference = copy.deepcopy(model).to(device).eval()
        self.cur, self.ref = GraphRunner(self.work), GraphRunner(self.reference)
        self.batches = batches
        self.cur_store = ActivationStore(memory_limit, store_dtype, spill_dir)
        self.ref_store = ActivationStore(memory_limit, store_dtype, spill_dir)
        names = [p.name for p in self.cur.placeholders]
        self.masks = [batch_ops.padding_mask(batch_ops.to_device(b, device), names) for b in batches]
        for i, batch in enumerate(batches):
            self.cur_store.put(i, self.cur.start(batch_ops.to_device(batch, device)))
            self.ref_store.put(i, self.ref.start(batch_ops.to_device(batch, device)))
        self.position = 0  # both frontiers are at this node
        self.node_batches = {"compressed": 0, "original": 0}  # nodes run, summed over batches
        self.seconds = {"forward": 0.0, "statistics": 0.0}

    def samples(self) -> int:
        return sum(batch_ops.size(b) for b in self.batches)

    def statistics(self, specs: list[ConsumerSpec], cut: int, last: int, next_cut: int, seed: int,
                   on_batch: Callable[[int, int], None] | None = None) -> dict[str, tuple]:
        """Partial Gram and cross sums of the consumers ``specs`` (called at nodes up to ``last``)
        over this shard's batches; afterwards the compressed model's frontier is at ``cut`` and the
        original's at ``next_cut``. ``on_batch(done, samples)`` after each batch."""
        nodes = {n: s.name for s in specs for n in s.nodes}
        by_name = {s.name: s for s in specs}
        acc: dict[str, ConsumerStats] = {}
        streams = {s.stream for s in specs if s.stream is not None}  # residual streams the writers add to
        samples = 0
        for b in range(len(self.batches)):
            captured: dict[str, list] = {}
            ref_captured: dict[str, list] = {}
            watch = {n: (lambda x, name=name: captured.setdefault(name, []).append(x)) for n, name in nodes.items()}
            ref_watch = {n: (lambda x, name=name: ref_captured.setdefault(name, []).append(x))
                         for n, name in nodes.items()}
            values: dict[str, torch.Tensor] = {}
            ref_values: dict[str, torch.Tensor] = {}
            taps = {n: (lambda v, n=n: values.setdefault(n, v)) for n in streams}
            ref_taps = {n: (lambda v, n=n: ref_values.setdefault(n, v)) for n in streams}
            start = time.perf_counter()
            snapshot = self._run(self.cur, self.cur_store.get(b), self.position, cut, watch, taps)
            self._run(self.cur, snapshot, cut, last + 1, watch, taps)
            ref_env = self.ref_store.get(b)
            if next_cut <= last + 1:
                ref_snapshot = self._run(self.ref, ref_env, self.position, next_cut, ref_watch, ref_taps, True)
                self._run(self.ref, ref_snapshot, next_cut, last + 1, ref_watch, ref_taps, True)
            else:
                ahead = self._run(self.ref, ref_env, self.position, last + 1, ref_watch, ref_taps, True)
                ref_snapshot = self._run(self.ref, ahead, last + 1, next_cut, {}, None, True)
            self.seconds["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            self._accumulate(acc, by_name, captured, ref_captured, b, seed, values, ref_values)
            self.seconds["statistics"] += time.perf_counter() - start
            self.cur_store.put(b, snapshot)
            self.ref_store.put(b, ref_snapshot)
            samples += batch_ops.size(self.batches[b])
            if on_batch is not None:
                on_batch(b + 1, samples)
        self.position = cut
        return {name: s.as_tuple() for name, s in acc.items()}

    def _accumulate(self, acc, specs, captured, ref_captured, b: int, seed: int, values, ref_values) -> None:
        index = self.first + b  # the global batch index: sampled positions do not depend on the split
        grams = BatchGrams(self.max_positions, seed * 1_000_003 + index * 101, mask=self.masks[b])
        for name, inputs in captured.items():
            for call, x in enumerate(inputs):
                spec = specs[name]
                part = grams.stats(name, spec, x, call, spec, ref_captured[name][call])
                part.gram, part.cross = part.gram.cpu(), part.cross.cpu()
                if spec.stream is not None:
                    part.drift = grams.drift(name, spec, x, call, ref_values[spec.stream] - values[spec.stream]).cpu()
                if name in acc:
                    acc[name].add(part)
                else:
                    acc[name] = part

    def _run(self, runner: GraphRunner, env, start: int, stop: int, watch, taps=None, reference: bool = False):
        if stop <= start:
            return env
        ran = sum(1 for i in range(start, stop) if runner.nodes[i].op != "placeholder")
        self.node_batches["original" if reference else "compressed"] += ran
        with torch.no_grad():
            return runner.run(env, start, stop, watch, taps)

    def advance(self, cut: int, next_cut: int) -> None:
        """After a solve: the compressed model's frontier runs from ``cut`` (unchanged by the solve)
        to ``next_cut`` with the new weights; the original's is already there."""
        start = time.perf_counter()
        for b in range(len(self.batches)):
            self.cur_store.put(b, self._run(self.cur, self.cur_store.get(b), cut, next_cut, {}))
        self.seconds["forward"] += time.perf_counter() - start
        self.position = next_cut

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
                "spilled": self.cur_store.spilled + self.ref_store.spilled}

    def close(self) -> None:
        self.cur_store.close()
        self.ref_store.close()
