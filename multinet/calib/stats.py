"""Streaming Gram statistics of consumer inputs, float64, memory independent of the sample count.

For each consumer we accumulate, over every row its weights see (one per sample for a Linear,
one per output position for a conv), G = X^T X with a trailing column of ones (so a bias
absorbs mean shifts). In sequential mode X comes from the model being compressed and the
statistics also hold the cross term C = X^T X_ref with the *original* model's input, so the
reconstruction aims at the original outputs and errors do not compound layer after layer.
Only C W_ref is ever used; where the consumer has fewer outputs d than half its input columns m
(a 3x3 conv: m = 9 x its inputs) the cached-input pipeline accumulates X^T (X_ref - X) W_ref
instead (``delta_cross``: 2 m d instead of m^2 per row), and the driver adds G W_ref once
(``resolved``). Written as a difference, the term is exactly G W_ref where the consumer's input has
not changed yet, as the m x m form is: the fit then returns the original weights to the last bit.
Sums are additive: shards can be reduced anywhere.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import InputShapeError, MultinetError
from ..solve.problem import all_finite
from . import batches
from .batches import Batch, token_rows
from .unfold import conv_as_rows, conv_geometry, linear_rows, output_grid, unfold_conv_input


@dataclass
class ConsumerStats:
    gram: torch.Tensor  # (m+1) x (m+1): X^T X with the ones column last
    cross: torch.Tensor | None = None  # (m+1) x (m_ref+1): X^T X_ref (sequential mode)
    rows: int = 0
    drift: torch.Tensor | None = None  # (m+1) x outputs: X^T (r_ref - r) for a residual stream's writer
    # (m+1) x outputs: X^T (X_ref - X) W_ref, accumulated instead of ``cross`` where cheaper (module doc)
    delta_cross: torch.Tensor | None = None
    # (m+1) x outputs: X^T X_ref W_ref, the cross term through the original weights (``resolved``)
    target_cross: torch.Tensor | None = None

    def add(self, other: "ConsumerStats") -> None:
        self.gram += other.gram
        for field in ("cross", "drift", "delta_cross", "target_cross"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if (mine is None) != (theirs is None):
                raise MultinetError(f"statistics of one consumer disagree on their {field} term: cannot add them")
            if mine is not None:
                mine += theirs
        self.rows += other.rows

    def owned(self) -> "ConsumerStats":
        """These statistics as float64 tensors of their own, to accumulate later batches into: a batch's
        Gram is the GEMM's float32 result, which consumers reading the same tensor share (``BatchGrams``),
        so it is converted once, where a sum starts, and added into it (float32 + float64 in place: the
        same sum to the bit as converting first) instead of being copied for every consumer and batch."""
        def own(t):
            return None if t is None else t.to(torch.float64, copy=True)

        return ConsumerStats(own(self.gram), own(self.cross), self.rows, own(self.drift), own(self.delta_cross),
                             own(self.target_cross))

    def as_tuple(self) -> tuple:
        """The fields in order, as they travel between a shard and the driver."""
        return self.gram, self.cross, self.rows, self.drift, self.delta_cross, self.target_cross

    def resolved(self, target: torch.Tensor) -> "ConsumerStats":
        """``delta_cross`` turned into ``target_cross`` = G W_ref + X^T (X_ref - X) W_ref, with ``target``
        the W_ref (bias row last) the shards multiplied by; before any column is taken out."""
        if self.delta_cross is None:
            return self
        through = self.gram.double() @ target.double() + self.delta_cross.double()
        return ConsumerStats(self.gram, None, self.rows, self.drift, None, through)


@dataclass
class ConsumerSpec:
    """How to turn one consumer call's input into rows: from the fx node that calls it."""

    name: str
    kind: str  # conv | linear
    nodes: list[str]
    geometry: dict | None = None
    bias: bool = True
    stream: str | None = None  # the node this consumer's output is added to (a residual stream), if any


class Capture(fx.Interpreter):
    """Runs a GraphModule and hands the first input of watched nodes to a callback, and the outputs
    of tapped nodes to ``taps`` (node name -> value)."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, str], callback, tapped: Iterable[str] = (),
                 taps: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.watched = watched  # node name -> consumer name
        self.callback = callback
        self.tapped, self.taps = set(tapped), taps

    def run_node(self, n: fx.Node):
        if n.name in self.watched:
            self.callback(self.watched[n.name], self.fetch_args_kwargs_from_env(n)[0][0])
        out = super().run_node(n)
        if n.name in self.tapped:
            self.taps[n.name] = out
        return out


@dataclass
class SampledRows:
    """A consumer input already turned into the rows its statistics use (``input_rows``, or
    ``output_rows`` for a stream's value): what the cached-input pipeline keeps of an original-model
    value that a later group reads, where that is smaller than the value itself (the positions a
    group samples are known in advance: they depend only on its seed, the batch and the call)."""

    rows: torch.Tensor


def _sampled_positions(per_sample: int, max_positions: int | None, gen: torch.Generator) -> torch.Tensor | None:
    """Which of a conv's ``per_sample`` output positions the statistics use (the same for every
    sample; None: all)."""
    if max_positions and per_sample > max_positions:
        return torch.randperm(per_sample, generator=gen)[:max_positions]
    return None


def _linear_rows(x: torch.Tensor, max_positions: int | None, gen: torch.Generator,
                 keep_rows: torch.Tensor | None) -> torch.Tensor:
    """A Linear's rows. On an image grid channels-last ((N, H, W, C): ConvNeXt's and Swin's pointwise
    layers, a 1x1 conv in another layout) at most ``max_positions`` positions per sample, drawn as a
    conv's are: every position made their Grams 49x a conv's rows at 56x56 and the statistics most of a
    ConvNeXt compression. A sequence (N, T, C) keeps every token (``keep_rows``: the real ones)."""
    if x.ndim >= 4 and keep_rows is None:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        pick = _sampled_positions(flat.shape[1], max_positions, gen)
        if pick is not None:
            flat = flat[:, pick.to(flat.device)]
        return flat.reshape(-1, flat.shape[-1])
    rows = linear_rows(x)
    return rows if keep_rows is None else rows[keep_rows]


def input_rows(spec: ConsumerSpec, x: torch.Tensor, max_positions: int | None, gen: torch.Generator,
               dtype: torch.dtype = torch.float64, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The rows a consumer's weights multiply (sampled conv positions, or a channels-last Linear's
    sampled grid positions) in ``dtype``, with a ones column last.

    ``keep_rows`` (a Linear's rows, e.g. real tokens, not padding) selects the rows that count."""
    if spec.kind != "linear":  # sampled before unfolding: only these patches are built, ones column and all
        per_sample = math.prod(output_grid(x, spec.geometry))
        return unfold_conv_input(x, spec.geometry, _sampled_positions(per_sample, max_positions, gen),
                                 ones_column=True, dtype=dtype)
    rows = _linear_rows(x, max_positions, gen, keep_rows)
    out = torch.empty(rows.shape[0], rows.shape[1] + 1, dtype=dtype, device=rows.device)
    out[:, :-1] = rows  # converted in the copy that appends the ones column
    out[:, -1] = 1
    return out


def output_rows(spec: ConsumerSpec, y: torch.Tensor, max_positions: int | None,
                gen: torch.Generator, dtype: torch.dtype = torch.float64,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor shaped like the consumer's output (``y``: samples x outputs x positions for a conv,
    ... x outputs for a Linear) as rows x outputs, row for row with ``input_rows`` of the consumer's
    input (``gen`` seeded as it was there: the same sampled positions; a conv's output grid has as
    many positions as ``input_rows`` unfolds)."""
    if spec.kind == "linear":
        rows = _linear_rows(y, max_positions, gen, keep_rows)
    else:
        flat = y.flatten(2)  # N x outputs x positions, row-major over the output grid like the unfold
        pick = _sampled_positions(flat.shape[2], max_positions, gen)
        if pick is not None:
            flat = flat[:, :, pick.to(flat.device)]
        rows = flat.transpose(1, 2).reshape(-1, flat.shape[1])
    return rows.to(dtype)


class BatchGrams:
    """One batch's statistics: each distinct consumer input is unfolded and multiplied once.

    Consumers that read the same tensor the same way (q/k/v projections, the readers of a residual
    stream) share one Gram. Each Gram is one GEMM in ``precision`` (float32: about twice as fast as
    float64 on a CPU, relative error ~3e-7 on the zoo's statistics) added into float64 sums."""

    def __init__(self, max_positions: int | None, gen_state: int, precision: torch.dtype = torch.float32,
                 mask: torch.Tensor | None = None):
        self.max_positions, self.gen_state, self.precision = max_positions, gen_state, precision
        self.mask = mask  # the batch's real tokens: padding rows are left out (same rows in both models)
        self._rows: dict[tuple, torch.Tensor] = {}
        self._products: dict[tuple, torch.Tensor] = {}

    def _generator(self, call: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.gen_state + call)  # both models sample the same positions

    def input_rows(self, spec: ConsumerSpec, x: torch.Tensor, call: int) -> torch.Tensor:
        """``x`` as the rows this batch's statistics of call ``call`` of ``spec`` use."""
        return input_rows(spec, x, self.max_positions, self._generator(call), self.precision,
                          token_rows(self.mask, x))

    def output_rows(self, spec: ConsumerSpec, y: torch.Tensor, call: int) -> torch.Tensor:
        """A value shaped like the consumer's output, row for row with ``input_rows``."""
        return output_rows(spec, y, self.max_positions, self._generator(call), self.precision,
                           token_rows(self.mask, y))

    def rows(self, name: str, spec: ConsumerSpec, x: torch.Tensor | SampledRows, call: int
             ) -> tuple[tuple, torch.Tensor]:
        key = (id(x), spec.kind, repr(spec.geometry), call)
        if key not in self._rows:
            rows = x.rows.to(self.precision) if isinstance(x, SampledRows) else self.input_rows(spec, x, call)
            if not all_finite(rows):
                raise MultinetError(f"activations entering `{name}` contain NaN or Inf: check the model and data")
            self._rows[key] = rows
        return key, self._rows[key]

    def stats(self, name: str, spec: ConsumerSpec, x: torch.Tensor, call: int, ref_spec: ConsumerSpec | None = None,
              ref_x: torch.Tensor | None = None, ref_target: torch.Tensor | None = None) -> ConsumerStats:
        """Gram of ``x``'s rows; with ``ref_x`` the cross term with the reference input's rows, or, given
        ``ref_target`` (the reference weights with the bias row last, m+1 x d), X^T (X_ref - X) ref_target
        (the same columns in both models: the full-width pipeline)."""
        key, rows = self.rows(name, spec, x, call)
        gram = self._product(key, key, rows, rows)
        if ref_x is None:
            return ConsumerStats(gram, None, rows.shape[0])
        if ref_target is not None and (moved := self._moved_by_conv(name, spec, x, ref_x, ref_target)) is not None:
            return ConsumerStats(gram, None, rows.shape[0], delta_cross=(rows.T @ moved).to(torch.float64))
        ref_key, ref_rows = self.rows(name, ref_spec, ref_x, call)
        if ref_target is None:
            return ConsumerStats(gram, self._product(key, ref_key, rows, ref_rows), rows.shape[0])
        if ref_rows.shape != rows.shape or ref_target.shape[0] != rows.shape[1]:
            raise MultinetError(f"`{name}`: the original model's input rows {tuple(ref_rows.shape)} and weights "
                                f"{tuple(ref_target.shape)} do not line up with the compressed model's rows "
                                f"{tuple(rows.shape)}")
        moved = (ref_rows - rows) @ ref_target.to(rows)  # zero where the input has not changed
        return ConsumerStats(gram, None, rows.shape[0], delta_cross=(rows.T @ moved).to(torch.float64))

    def _moved_by_conv(self, name: str, spec: ConsumerSpec, x: torch.Tensor, ref_x, ref_target: torch.Tensor
                       ) -> torch.Tensor | None:
        """(X_ref - X) W_ref as one conv of the input difference with the reference weights, where a conv
        uses every output position (nothing sampled): no im2col of the reference input, and a subtraction
        on the input instead of on its kernel-times larger rows (the bias rows cancel). None where the
        rows are sampled (a conv over every position would cost more than the sampled GEMM) or the
        inputs are not two plain tensors of one shape."""
        if spec.kind != "conv" or not isinstance(ref_x, torch.Tensor) or ref_x.shape != x.shape:
            return None
        if self.max_positions and math.prod(output_grid(x, spec.geometry)) > self.max_positions:
            return None
        diff = ref_x.to(self.precision) - x.to(self.precision)
        if not all_finite(diff):
            raise MultinetError(f"activations entering `{name}` contain NaN or Inf: check the model and data")
        return conv_as_rows(diff, spec.geometry, ref_target[:-1].to(self.precision))

    def drift(self, name: str, spec: ConsumerSpec, x: torch.Tensor, call: int, reference: torch.Tensor | SampledRows,
              current: torch.Tensor) -> torch.Tensor:
        """X^T D for a stream writer: its input rows against D = r_ref - r (``reference`` and ``current``,
        the stream's values shaped like its output, or the reference's rows already) at the same rows.
        One GEMM in ``precision`` into float64."""
        key, rows = self.rows(name, spec, x, call)
        if isinstance(reference, SampledRows):
            d = reference.rows.to(self.precision) - self.output_rows(spec, current, call)
        else:
            d = self.output_rows(spec, reference - current, call)
        if d.shape[0] != rows.shape[0]:
            raise MultinetError(f"`{name}`: the residual stream it writes into has {d.shape[0]} rows, its input "
                                f"{rows.shape[0]}; turn off compensate_residuals for this model")
        return (rows.T @ d).to(torch.float64)

    def _product(self, left: tuple, right: tuple, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The product in ``precision``, shared by every consumer that asks for it: read only (a sum is
        started from ``ConsumerStats.owned`` and others are added into it)."""
        if (left, right) not in self._products:
            self._products[(left, right)] = gram_of(a) if left == right else a.T @ b
        return self._products[(left, right)]


SYMMETRIC_BLOCK = 768  # columns per block of a Gram computed by its upper triangle (below: one GEMM)


def gram_of(rows: torch.Tensor) -> torch.Tensor:
    """rows^T rows from its upper triangle of blocks, one GEMM per strip of block rows, mirrored:
    (k+1)/2k of the work for k blocks (BLAS's symmetric rank-k update, which torch does not expose).
    One GEMM where the matrix is too small for smaller GEMMs to pay."""
    m = rows.shape[1]
    if m < 2 * SYMMETRIC_BLOCK:
        return rows.T @ rows
    blocks = m // SYMMETRIC_BLOCK
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    out = rows.new_empty(m, m)
    for lo, hi in zip(edges, edges[1:]):
        out[lo:hi, lo:] = rows[:, lo:hi].T @ rows[:, lo:]  # a strip from the diagonal to the right
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def iterate_batches(data, batch_size: int = 128) -> Iterable[Batch]:
    """A tensor or dict of tensors (split into batches), or an iterable of batches (tensors, dicts of
    tensors) or of (inputs, targets) pairs, whose inputs may be a tuple or dict of tensors."""
    if isinstance(data, (torch.Tensor, Mapping)):
        yield from batches.split(data, batch_size)
        return
    seen = False
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]  # (inputs, targets): several positional inputs come as ((a, b), targets)
        seen = True
        yield batches.check_batch(batch)
    if not seen:
        raise MultinetError("no calibration data: the iterable yielded no batch")


def first_sample(data, batch_size: int = 128) -> Batch:
    """The first calibration sample as a batch of one (what tracing and shape checks run on)."""
    return batches.take(next(iter(iterate_batches(data, batch_size))), 0, 1)


def collect(model: fx.GraphModule, specs: list[ConsumerSpec], data, reference: fx.GraphModule | None = None,
            reference_specs: list[ConsumerSpec] | None = None, batch_size: int = 128,
            max_positions: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
            progress=None, first_batch: int = 0, warn: bool = True, precision: torch.dtype = torch.float64,
            outputs=None) -> dict[str, ConsumerStats]:
    """Accumulate statistics for ``specs`` over ``data``.

    ``outputs(batch, out)``, where given, receives each batch (on ``device``) and ``model``'s output on it:
    a caller that also needs the model's outputs on the calibration samples takes them from this pass.

    With ``reference`` (the original model) the cross term with the reference model's input at
    the consumer of the same name is accumulated as well (sequential mode), and for the specs with
    a ``stream`` the drift term against the difference of the stream's values (a stream that is
    still whole: graph.streams gives no writer of a pruned one).
    """
    stats: dict[str, ConsumerStats] = {}
    by_name = {s.name: s for s in specs}
    ref_by_name = {s.name: s for s in reference_specs or []}
    watched = {n: s.name for s in specs for n in s.nodes}
    ref_watched = {n: s.name for s in reference_specs or [] for n in s.nodes}
    # a residual stream's writers: the stream's value in both models (sequential mode only)
    ref_streams = {s.name: s.stream for s in reference_specs or [] if s.stream is not None}
    streams = {s.name: s.stream for s in specs if s.stream is not None and s.name in ref_streams}
    ref_streams = {k: v for k, v in ref_streams.items() if k in streams}
    model = model.to(device).eval()
    if reference is not None:
        reference = reference.to(device).eval()
    names = batches.input_names(model)
    for batch_index, batch in enumerate(iterate_batches(data, batch_size), start=first_batch):
        batch = batches.to_device(batch, device)
        args, mask = batches.as_args(batch, names), batches.padding_mask(batch, names)
        captured: dict[str, list[torch.Tensor]] = {}
        ref_captured: dict[str, list[torch.Tensor]] = {}
        taps: dict[str, torch.Tensor] = {}
        ref_taps: dict[str, torch.Tensor] = {}
        # one seed per batch and call, shared by both models, so that sub-sampled positions line up
        gen_state = seed * 1_000_003 + batch_index * 101
        with torch.no_grad():
            try:
                out = Capture(model, watched, lambda name, x: captured.setdefault(name, []).append(x),
                              streams.values(), taps).run(*args)
                if reference is not None:
                    Capture(reference, ref_watched, lambda name, x: ref_captured.setdefault(name, []).append(x),
                             ref_streams.values(), ref_taps).run(*args)
            except Exception as exc:
                raise InputShapeError(f"calibration batch of shape {batches.describe(batch)} does not fit the model: "
                                      f"{str(exc).strip().splitlines()[0]}") from exc
        if outputs is not None:
            outputs(batch, out)
        del out
        grams = BatchGrams(max_positions, gen_state, precision, mask)
        for name, inputs in captured.items():
            for call, x in enumerate(inputs):
                part = grams.stats(name, by_name[name], x, call, ref_by_name.get(name),
                                   ref_captured[name][call] if reference is not None else None)
                if name in streams:
                    part.drift = grams.drift(name, by_name[name], x, call, ref_taps[ref_streams[name]],
                                             taps[streams[name]])
                if name in stats:
                    stats[name].add(part)
                else:
                    stats[name] = part.owned()
        if progress is not None:
            progress(batches.size(batch))
    if warn:
        warn_few_rows(stats)
    missing = set(by_name) - set(stats)
    if missing:
        raise MultinetError(f"consumers never ran on the calibration data: {sorted(missing)}")
    for s in stats.values():  # accumulated on ``device``; handed back on the CPU for the solvers
        s.gram = s.gram.cpu()
        s.cross = s.cross.cpu() if s.cross is not None else None
        s.drift = s.drift.cpu() if s.drift is not None else None
    return stats


def warn_few_rows(stats: dict[str, ConsumerStats]) -> None:
    for name, s in stats.items():
        columns = s.gram.shape[0]
        if s.rows < 4 * columns:
            warnings.warn(f"`{name}`: {s.rows} calibration rows for {columns} columns; the reconstruction may fit "
                          f"the calibration set rather than the data (use more samples)", stacklevel=3)


def consumer_specs(graph, names: Iterable[str], streams: Mapping[str, str] | None = None) -> list[ConsumerSpec]:
    """Specs for the named consumers of a ChannelGraph; ``streams``: consumer -> the node of the residual
    stream its output is added to (graph.streams.residual_partners), for those whose drift is wanted."""
    gm = graph.module
    nodes = {n.name: n for n in gm.graph.nodes}
    specs = []
    for name in names:
        use = graph.analysis.layers[name]
        node = nodes[use.nodes[0]]
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if use.kind == "conv":
            weight = module.weight if module is not None else getattr(gm, name)
            geom = conv_geometry(module, node.args, node.kwargs, tuple(weight.shape))
        else:
            geom = None
        specs.append(ConsumerSpec(name, use.kind, list(use.nodes), geom, stream=(streams or {}).get(name)))
    return specs

