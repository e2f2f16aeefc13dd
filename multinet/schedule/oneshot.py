"""One calibration pass over the original model, and everything the scheduler derives from it.

* ``GroupCurve``: each group's greedy REAP removal order and its layer-wise error curve E(k),
  from one solve per group (the per-step errors of REAP add up to the error after k removals).
* ``MaskedModel``: the model with any per-group removal sets applied *without* surgery: removed
  channels keep flowing but every consumer reads them with zero weight, and the remaining weights
  are least-squares re-solved from the same statistics. Its outputs equal those of the pruned,
  one-shot reconstructed model, so the error at the final outputs of any candidate schedule costs
  one forward pass and no re-trace.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..calib import batches, consumer_specs, iterate_batches
from ..calib.batches import Batch
from ..calib.frontier import GraphRunner
from ..calib.sharded import collect_on
from ..graph import ChannelGraph
from ..pipeline.consumer_weights import consumer_matrix, consumer_weight, has_bias_row, write_matrix
from ..pipeline.group_problems import group_problems
from ..pipeline.grouped_conv import GroupedConsumer, curve_job, solve_curve_job
from ..solve import ConsumerProblem, reap_greedy_multi
from ..solve.reap import invert
from ..solve.refit import ColumnRefit
from ..solve.problem import prepare_gram


@dataclass
class GroupCurve:
    group: int
    size: int
    order: list[int]  # channels in REAP's removal order
    errors: np.ndarray  # layer-wise error after k removals, k = 0..len(order) (errors[0] = 0)

    @property
    def max_remove(self) -> int:
        return len(self.order)


def one_shot_stats(graph: ChannelGraph, group_ids: Sequence[int], data, batch_size: int, max_positions: int | None,
                   device: str, seed: int, executor=None, outputs=None):
    """Gram statistics of every consumer of the given groups, in one pass over the data (sharded
    over the executor's workers when it has several). Each batch's Gram is one float32 GEMM added into
    float64 sums, as in the sequential pipeline: half the time of a float64 GEMM, ~3e-7 relative
    rounding, which the solver's Cholesky absorbs (``invert``). ``outputs``: see ``calib.collect``
    (an ``EvaluationOutputs``)."""
    names = list(dict.fromkeys(n for g in group_ids for n in graph.group(g).consumer_names))
    return collect_on(executor, graph.module, consumer_specs(graph, names), data, batch_size=batch_size,
                      max_positions=max_positions, device=device, seed=seed, precision=torch.float32,
                      outputs=outputs)


class EvaluationOutputs:
    """The original model's outputs on the evaluation samples, taken from the statistics pass.

    The masked evaluator compares every candidate with these outputs; computed on their own they cost
    a forward pass over the evaluation samples, a whole plain pass where those are every calibration
    sample (the default 1,024 of 1,024; on ResNet-50 at 224x224, 0.8-1 of the ~10 passes a budget run
    took). The statistics pass runs the same model on the same batches first, so its outputs are kept
    instead. Each batch it sees is checked against the evaluation batch of the same index (a shuffling
    loader gives other samples each time it is read): any difference, or a pass that ran elsewhere (a
    sharded executor), leaves ``reference()`` None and the evaluator runs its own pass, as before."""

    def __init__(self, model: nn.Module, inputs: Sequence[Batch]):
        self.model, self.inputs = model, list(inputs)
        self.names = batches.input_names(model)
        self.parts: list[list[torch.Tensor]] = []
        self.valid = True

    def __call__(self, batch: Batch, out) -> None:
        index = len(self.parts)
        if not self.valid or index >= len(self.inputs):
            return
        wanted = self.inputs[index]
        n = batches.size(wanted)
        if n < batches.size(batch):  # the evaluation set ends inside this batch: run its cut as the evaluator does
            batch = batches.take(batch, 0, n)
            with torch.no_grad():
                out = batches.call(self.model, batch)
        if not batches.same_batches([batch], [wanted]):
            self.valid = False
            return
        self.parts.append(output_parts(real_tokens(out, batches.padding_mask(batch, self.names))))

    def reference(self) -> list[torch.Tensor] | None:
        """Per output, the outputs on every evaluation sample; None where the pass did not give them all."""
        if not self.valid or len(self.parts) != len(self.inputs) or not self.parts:
            return None
        return join_outputs(self.parts)


def _solve_job(job: dict) -> tuple[list[int], np.ndarray]:
    """One group's whole greedy REAP sequence, from plain tensors (runs on any executor)."""
    if "partitions" in job:
        return solve_curve_job(job)
    device = job.get("device", "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a worker without a GPU solves on its CPU
    problems = [ConsumerProblem(*p).to(device) for p in job["problems"]]
    result = reap_greedy_multi(problems, job["size"], job["n_remove"], job["damp"], job["pieces"],
                               allow_all=job["n_remove"] == job["size"])
    return list(result.removed), result.errors.numpy()


def group_curves(graph: ChannelGraph, max_remove: dict[int, int], stats, damp: float, executor=None,
                 device: str = "cpu", masked: "MaskedModel | None" = None) -> dict[int, GroupCurve]:
    """Every group's removal order and error curve: independent solves, one job per group. ``masked``: an
    evaluator on the same statistics and damping, handed the inverse Grams factored here (its search
    would otherwise factor every consumer again)."""
    from ..runtime.executors import resolve_executor

    jobs, ids = [], []
    for gid, n in max_remove.items():
        group = graph.group(gid)
        if n <= 0:
            continue
        if group.grouped_conv:  # equal counts per conv group (see pipeline/grouped_conv.py)
            jobs.append(curve_job(graph, group, stats, damp, n, device))
            ids.append(gid)
            continue
        problems, layout = group_problems(graph, graph, group, stats, damp, {})
        if masked is not None:
            masked.adopt_inverses(problems, [name for name, *_ in layout])
        jobs.append(dict(problems=[(p.gram, p.weight, p.channels, p.columns, p.scale, p.inverse) for p in problems],
                         size=group.size, n_remove=n, damp=damp, pieces=list(group.pieces), device=device))
        ids.append(gid)
    solved = dict(zip(ids, resolve_executor(executor).map(_solve_job, jobs)))
    curves = {}
    for gid in max_remove:
        size = graph.group(gid).size
        if gid not in solved:
            curves[gid] = GroupCurve(gid, size, [], np.zeros(1))
            continue
        removed, errors = solved[gid]
        curves[gid] = GroupCurve(gid, size, removed, np.concatenate([[0.0], np.cumsum(errors)]))
    return curves


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor],
                 weights: Sequence[float] | None = None) -> float:
    """Squared error at the final outputs as a fraction of their energy, averaged over the outputs
    (a MultiNet's models count equally, whatever the scale of their logits), or weighted by ``weights``."""
    errors = [float(((o - r) ** 2).sum() / (r ** 2).sum().clamp_min(1e-30)) for o, r in zip(outputs, reference)]
    return _combined(errors, weights)


def sample_output_errors(outputs: list[torch.Tensor], reference: list[torch.Tensor], energy: list[torch.Tensor],
                         weights: Sequence[float] | None = None, samples: int | None = None) -> torch.Tensor:
    """Per sample, its squared error at each output over ``energy`` (that output's mean energy per
    sample on the whole evaluation set), combined over the outputs as ``output_error`` combines them.
    Their mean over every evaluation sample is ``output_error``; over some samples, an estimate of it.
    ``samples``: how many samples the rows hold (an output may have several rows per sample, a sample's
    rows together: ``h.reshape(-1, C)`` of a (B, T, C) tensor); None: a row per sample."""
    errors = [((o - r) ** 2).reshape(samples if samples is not None else len(o), -1).sum(1) / e.clamp_min(1e-30)
              for o, r, e in zip(outputs, reference, energy)]
    return _combined(errors, weights)


def _combined(errors: list, weights: Sequence[float] | None):
    if weights is None:
        return sum(errors) / len(errors)
    return sum(w * e for w, e in zip(weights, errors)) / sum(weights)


def check_output_weights(weights: Sequence[float] | None, n_outputs: int) -> None:
    if weights is not None and len(weights) != n_outputs:
        from .budget import BudgetError

        raise BudgetError(f"output_weights has {len(weights)} weights, the model has {n_outputs} outputs")


def output_parts(out) -> list[torch.Tensor]:
    """A model's outputs (tensor, tuple, list or dict of tensors) as float64 matrices, one per output: a
    row per sample (a 1-D output, one number per sample, is a column; a 0-D one a 1 x 1 matrix)."""
    if isinstance(out, torch.Tensor):
        value = out.detach().double()
        return [value.reshape(len(value), -1) if value.ndim else value.reshape(1, 1)]
    if isinstance(out, Mapping):
        out = list(out.values())
    return [part for o in out for part in output_parts(o)]


def join_outputs(parts: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per output, its matrices from every batch stacked (a row per sample). Where batches differ in an
    output's width (images of other sizes through a fully convolutional model, a detector's backbone),
    that output becomes one row of all its numbers: errors over it stay exact, only errors per sample are
    not available (``MaskedModel.per_sample`` finds it), and no sample's numbers are mixed with another's."""
    joined = []
    for column in zip(*parts):
        if len({tuple(t.shape[1:]) for t in column}) == 1:
            joined.append(torch.cat(column))
        else:
            joined.append(torch.cat([t.reshape(-1) for t in column])[None])
    return joined


def run_outputs(model, inputs: list[Batch]) -> list[torch.Tensor]:
    """Outputs of ``model`` over batches of inputs, concatenated per output (padding tokens zeroed)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    names = batches.input_names(model)
    parts = []
    with torch.no_grad():
        for x in inputs:
            x = batches.to_device(x, device)
            parts.append(output_parts(real_tokens(batches.call(model, x), batches.padding_mask(x, names))))
    return join_outputs(parts)


def real_tokens(out, mask: torch.Tensor | None):
    """Outputs with padding positions zeroed: what a model computes there is no one's output."""
    if mask is None:
        return out

    def zero_padding(t):
        if not isinstance(t, torch.Tensor) or t.ndim < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
            return t
        return t * mask.reshape(*mask.shape, *[1] * (t.ndim - 2)).to(t.dtype)

    return pytree.tree_map(zero_padding, out)


def evaluation_inputs(data, batch_size: int, limit: int) -> list[Batch]:
    """The first ``limit`` calibration samples, in batches: where final-output errors are measured."""
    return first_samples(iterate_batches(data, batch_size), limit)


def first_samples(batched, limit: int) -> list[Batch]:
    """The batches holding the first ``limit`` samples of ``batched``, the last one cut to size."""
    return sample_slice(batched, 0, limit)


def sample_slice(batched, start: int, stop: int) -> list[Batch]:
    """Samples ``start .. stop-1`` of ``batched`` (an iterable of batches), batched as they were, cut to
    size at both ends; the iterable is read no further than ``stop``."""
    chosen, seen = [], 0
    for batch in batched:
        n = batches.size(batch)
        if seen + n > start:
            chosen.append(batches.take(batch, max(start - seen, 0), stop - seen))
        seen += n
        if seen >= stop:
            break
    return chosen


@dataclass
class _Consumer:
    name: str
    gram: torch.Tensor  # as collected (m x m); damped only where this consumer factors it itself
    damp: float
    weight: torch.Tensor  # original (m x d), bias row last when has_bias
    slots: list[tuple[int, torch.Tensor, torch.Tensor]]  # (group, channels, column blocks)
    shape: tuple[int, ...]
    has_bias: bool
    refit: ColumnRefit | None = None  # made (or given its inverse) on the first re-solve

    def factor(self, inverse: torch.Tensor | None = None) -> None:
        """The full-column least-squares fit of the original outputs, inverse @ G @ W, from the inverse
        adopted from a problem built with the same damping, or made here. Deferred to the first re-solve:
        an evaluator whose consumers are never re-solved, or whose inverses come from the groups' problems,
        neither damps a copy nor multiplies G @ W up front."""
        if inverse is None:
            inverse = invert(prepare_gram(self.gram, self.damp)[0], tolerate_rounding=True)
        inverse = inverse.to(torch.float64)
        fit = inverse @ (self.gram.double() @ self.weight)
        self.refit = ColumnRefit(self.gram, fit, self.damp, inverse, restore=self.weight)

    def without(self, cols: torch.Tensor) -> torch.Tensor:
        """The least-squares weight once columns ``cols`` are gone (see solve.refit)."""
        if not len(cols):
            return self.weight
        if self.refit is None:  # factored once per consumer, then every removal set is a small update
            self.factor()
        return self.refit.without(cols)


class MaskedModel:
    """Final-output error of one-shot REAP reconstructions for any removal sets (see module doc)."""

    def __init__(self, graph: ChannelGraph, stats, group_ids: Sequence[int], inputs: list[torch.Tensor], damp: float,
                 device: str = "cpu", output_weights: Sequence[float] | None = None,
                 reference: list[torch.Tensor] | None = None):
        """``reference``: the model's outputs on ``inputs`` where already known (``EvaluationOutputs``);
        otherwise they are computed here, a forward pass over ``inputs``."""
        self.gm = copy.deepcopy(graph.module).to(device).eval()
        self.inputs = [batches.to_device(x, device) for x in inputs]
        self.device = device
        self.reference = run_outputs(self.gm, self.inputs) if reference is None else [r.to(device) for r in reference]
        self._energy: list[torch.Tensor] | None = None  # per output, for sample_errors
        self._rows_per_sample: list[int] | None = None  # per output, once found (see per_sample)
        self.samples = sum(batches.size(x) for x in self.inputs)  # evaluation samples in all
        check_output_weights(output_weights, len(self.reference))
        self.output_weights = output_weights
        wanted = set(group_ids)
        self.consumers: dict[str, _Consumer] = {}
        for gid in group_ids:
            for name in graph.group(gid).consumer_names:
                if name not in self.consumers:
                    self.consumers[name] = self._consumer(graph, name, stats[name], wanted, damp)
        self._loaded: dict[str, tuple] = {name: () for name in self.consumers}
        # per group, the graph position of its first consumer call: nothing before it changes with it
        node_names = {gid: [n for name in graph.group(gid).consumer_names for n in graph.analysis.layers[name].nodes]
                      for gid in group_ids}
        self._runner = GraphRunner(self.gm)
        self.first_change = {gid: min(self._runner.position[n] for n in names)
                             for gid, names in node_names.items() if names}

    @staticmethod
    def _consumer(graph: ChannelGraph, name: str, stats, wanted: set[int], damp: float) -> _Consumer:
        if graph.analysis.layers[name].conv_groups > 1:  # one problem per conv group
            return GroupedConsumer(graph, name, stats, wanted, damp)
        has_bias = has_bias_row(graph.module, name)
        weight = consumer_matrix(graph.module, name, has_bias)  # float64 on the CPU, like the statistics
        gram = stats.gram if has_bias else stats.gram[:-1, :-1]
        slots = [(g.id, sl.channels, sl.column_blocks()) for g in graph.groups if g.id in wanted
                 for sl in g.consumers if sl.consumer == name]
        shape = tuple(consumer_weight(graph.module, name)[0].shape)
        return _Consumer(name, gram, damp, weight, slots, shape, has_bias)

    @staticmethod
    def _removed_columns(c: _Consumer, removed: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Sorted input columns of ``c`` that the removed channels occupy."""
        gone = [blocks[torch.isin(channels, removed[gid])].flatten()
                for gid, channels, blocks in c.slots if gid in removed]
        return torch.unique(torch.cat(gone)) if gone else torch.zeros(0, dtype=torch.long)

    @staticmethod
    def _weights(c: _Consumer, cols: torch.Tensor) -> torch.Tensor:
        """The consumer re-solved by least squares without ``cols`` (which read zero weight)."""
        return c.solved(cols) if isinstance(c, GroupedConsumer) else c.without(cols)

    def adopt_inverses(self, problems, names: Sequence[str]) -> None:
        """Take consumers' inverse Grams from problems built on the same statistics with the same
        damping (group_problems' one-shot problems): the final re-solve then factors nothing again."""
        for p, name in zip(problems, names):
            c = self.consumers.get(name)
            if (isinstance(c, _Consumer) and c.refit is None and p.inverse is not None
                    and p.inverse.shape == c.gram.shape):
                c.factor(p.inverse)

    def _load(self, c: _Consumer, w: torch.Tensor) -> None:
        write_matrix(self.gm, c.name, w, c.has_bias)

    def to(self, device: str) -> "MaskedModel":
        self.gm = self.gm.to(device)
        self.inputs = [batches.to_device(x, device) for x in self.inputs]
        self.reference = [r.to(device) for r in self.reference]
        self._energy = None
        self.device = device
        return self

    def set_removed(self, removed: Mapping[int, Sequence[int]]) -> None:
        """Load every consumer's weights for these removals; only consumers whose removed columns
        changed since the last call are re-solved."""
        sets = {g: torch.as_tensor(list(r), dtype=torch.long) for g, r in removed.items() if len(r)}
        for name, c in self.consumers.items():
            cols = self._removed_columns(c, sets)
            key = tuple(cols.tolist())
            if key != self._loaded[name]:
                self._load(c, self._weights(c, cols))
                self._loaded[name] = key

    def set_zeroed(self, removed: Mapping[int, Sequence[int]]) -> None:
        """Load every consumer's original weights with the removed channels' columns zeroed: a
        selection without reconstruction (magnitude, random)."""
        sets = {g: torch.as_tensor(list(r), dtype=torch.long) for g, r in removed.items() if len(r)}
        for name, c in self.consumers.items():
            cols = self._removed_columns(c, sets)
            if isinstance(c, GroupedConsumer):
                weight = c.zeroed(cols)
            else:
                weight = c.weight.clone()
                weight[cols] = 0
            self._load(c, weight)
            self._loaded[name] = ("zeroed", *cols.tolist())

    def error(self, removed: Mapping[int, Sequence[int]]) -> float:
        """Relative squared error at the final outputs with these channels removed."""
        self.set_removed(removed)
        return output_error(run_outputs(self.gm, self.inputs), self.reference, self.output_weights)

    def errors_from_prefix(self, states: Sequence[Mapping[int, Sequence[int]]]) -> list[float]:
        """``error`` of each state, running only what the state can change (see ``_prefix_outputs``).
        Same values as ``error``; a probe of a late group costs a fraction of a pass."""
        errors: list[float] = [0.0] * len(states)
        for i, outputs in self._prefix_outputs(states, self.inputs):
            errors[i] = output_error(outputs, self.reference, self.output_weights)
        return errors

    @property
    def per_sample(self) -> bool:
        """Whether every output's rows come a sample at a time, the same number per sample (found once,
        on the first evaluation batch): only then can errors be measured on some samples (``sample_errors``).
        Not where an output mixes samples (a batch mean, rows ordered position-major: h.transpose(0, 1))."""
        if self._rows_per_sample is None:
            self._rows_per_sample = self._sample_layout()
        return bool(self._rows_per_sample)

    def _sample_layout(self) -> list[int]:
        """Rows per sample of each output ([] where some output's rows do not come a sample at a time): the
        unchanged model on the first half of the first batch (a slice that cuts a batch, as probes do) must
        give the reference's first rows, as many per sample as the reference has."""
        if not self.inputs or any(len(r) % self.samples for r in self.reference):
            return []
        first = sample_slice(self.inputs, 0, (batches.size(self.inputs[0]) + 1) // 2)[0]
        n = batches.size(first)
        self.set_removed({})
        names = batches.input_names(self.gm)
        with torch.no_grad():
            outputs = output_parts(real_tokens(batches.call(self.gm, first), batches.padding_mask(first, names)))
        per = [len(r) // self.samples for r in self.reference]
        if len(outputs) != len(per) or any(len(o) != k * n for o, k in zip(outputs, per)):
            return []
        if not all(torch.allclose(o, r[:len(o)], rtol=1e-4, atol=1e-6 * float(r.abs().max().clamp_min(1e-30)))
                   for o, r in zip(outputs, self.reference)):
            return []
        return per

    def sample_errors(self, states: Sequence[Mapping[int, Sequence[int]]], start: int, stop: int,
                      base: Mapping[int, Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Each state's per-sample errors (``sample_output_errors``) on evaluation samples ``start ..
        stop-1``: their mean over all samples is ``error``, and over a few an estimate whose spread says
        whether more samples are needed (the auto schedule's probes). ``base``: the removals the states
        share (a plan they vary): the frontier runs with those, so a state runs from where it differs.
        Where the outputs' rows do not come a sample at a time (``per_sample``), only every sample at
        once: each state's whole-set error, as one value."""
        if not self.per_sample:
            if (start, stop) != (0, self.samples):
                raise ValueError("these outputs mix samples: errors are measured on every evaluation sample at once")
            return [torch.tensor([output_error(outputs, self.reference, self.output_weights)], dtype=torch.float64)
                    for _, outputs in sorted(self._prefix_outputs(states, self.inputs, base), key=lambda io: io[0])]
        if self._energy is None:  # each output's mean energy per sample, on every evaluation sample
            self._energy = [(r ** 2).sum() / max(self.samples, 1) for r in self.reference]
        per = self._rows_per_sample
        inputs = sample_slice(self.inputs, start, stop)
        reference = [r[start * k:stop * k] for r, k in zip(self.reference, per)]
        errors: list[torch.Tensor] = [torch.zeros(0)] * len(states)
        for i, outputs in self._prefix_outputs(states, inputs, base):
            errors[i] = sample_output_errors(outputs, reference, self._energy, self.output_weights,
                                             stop - start).cpu()
        return errors

    def _prefix_outputs(self, states: Sequence[Mapping[int, Sequence[int]]], inputs: list[Batch],
                        base: Mapping[int, Sequence[int]] | None = None):
        """(index, outputs on ``inputs``) of each state, running only what it can change: states are
        taken in graph order of their first consumer whose removals differ from ``base`` (none: the
        original model), the unchanged prefix runs once with ``base``'s weights (a frontier over the
        batches), and each state runs from there to the outputs. Nothing before that consumer reads a
        group the state and ``base`` disagree on, so the prefix is the state's own."""
        runner = self._runner
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        names = batches.input_names(self.gm)
        base = {g: r for g, r in (base or {}).items() if len(r)}

        def differs(state, g) -> bool:
            return list(state.get(g, ())) != list(base.get(g, ()))

        starts = [min((self.first_change[g] for g in set(s) | set(base) if g in self.first_change and differs(s, g)),
                      default=runner.end) for s in states]
        self.set_removed(base)
        position, envs = 0, [runner.start(x) for x in inputs]
        with torch.no_grad():
            for i in sorted(range(len(states)), key=starts.__getitem__):
                if starts[i] > position:  # advance the frontier with the shared weights
                    self.set_removed(base)
                    envs = [runner.run(env, position, starts[i]) for env in envs]
                    position = starts[i]
                self.set_removed(states[i])
                parts = []
                for x, env in zip(inputs, envs):
                    end = runner.run(env, position, runner.end)
                    out = fx.node.map_arg(output.args[0], lambda n: end[n.name])
                    parts.append(output_parts(real_tokens(out, batches.padding_mask(x, names))))
                yield i, join_outputs(parts)


# --- the masked evaluator on executor workers (built once per worker, from plain data) ----------

def masked_setup(model_bytes: bytes, example, stats, group_ids, inputs, damp: float,
                 output_weights=None, reference: list[torch.Tensor] | None = None) -> MaskedModel:
    """Runs on a worker: rebuild the model from bytes and its masked evaluator (on its GPU if any).
    ``reference``: the driver's outputs on ``inputs``, used on a CPU worker (it saves that worker a pass over
    the evaluation samples); a GPU worker computes its own there, so that the model with nothing removed
    measures an error of 0 on it too."""
    from ..graph import trace
    from ..io import from_bytes

    graph = trace(from_bytes(model_bytes), example)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MaskedModel(graph, stats, group_ids, inputs, damp, device, output_weights,
                       reference if device == "cpu" else None)


def masked_error(masked: MaskedModel, removed) -> float:
    """One candidate's final-output error; a CUDA out-of-memory moves this worker's evaluator to the CPU."""
    return _on_cpu_if_out_of_memory(masked, lambda m: m.error(removed))


def masked_sample_errors(masked: MaskedModel, job) -> torch.Tensor:
    """One probe's per-sample errors (``job``: (state, start, stop, base)), as ``masked_error`` runs them."""
    state, start, stop, base = job
    return _on_cpu_if_out_of_memory(masked, lambda m: m.sample_errors([state], start, stop, base)[0])


def _on_cpu_if_out_of_memory(masked: MaskedModel, work):
    try:
        return work(masked)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return work(masked.to("cpu"))
