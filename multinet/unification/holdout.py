"""The calibration samples unify keeps out of every fit, so that its decisions are not fooled by them.

A link lets a layer read another member's channels: more columns in its least-squares problem, and
a REAP selection among more candidates. Both fit the calibration set better than they generalise,
so judged on the samples they were fitted on, a link can look like a gain where, on new inputs, it
is a loss: on digits (VGG digit + parity models at 8 % of their FLOPs) the parity member's unified
error was 0.76x its separate one on the calibration set and 1.67x on 773 held-out images. With
``holdout`` unify fits every candidate (each member alone, every link trial) on most of the samples and
compares them on the rest, then fits what it chose once more on all of them (see ``api._unify``).

The held-out samples are every ``round(1 / fraction)``-th one, spread over the whole set (a set sorted
by class still gives a held-out part of every class).
"""
from __future__ import annotations

from collections.abc import Iterator

from ..calib import iterate_batches
from ..calib import batches as batch_ops
from ..errors import MultinetError

# fraction of the calibration samples unify's decisions are made on; 0 (the default): fit and compare on the
# same samples. One in five (204 of 1,024 digits) chose as no holdout at every point measured; one in two
# removed the never-worse misses of the VGG digit + parity pair at 15 % and 8 % but made one in the MLP
# digit + parity pair at 4 % and gave up gains elsewhere (benchmarks/results/unify_holdout.md), so it is an
# option, not the default
HOLDOUT = 0.0
MIN_HELD = 16  # fewer held-out samples than this would decide by noise: decide in-sample instead


def check_fraction(fraction: float) -> float:
    if not 0 <= fraction <= 0.5:
        raise MultinetError(f"holdout must be between 0 and 0.5 (a fraction of the calibration samples), got "
                            f"{fraction!r}")
    return float(fraction)


def holdout_step(fraction: float, samples: int) -> int | None:
    """Every ``step``-th sample is held out; None where no holdout is made (``fraction`` 0, or too few
    samples to hold out ``MIN_HELD``)."""
    if fraction <= 0:
        return None
    step = max(2, round(1 / fraction))
    return step if samples // step >= MIN_HELD else None


def _rows(first: int, n: int, step: int, held: bool) -> list[int]:
    """Rows of a batch whose first sample is sample ``first`` of the set: the held-out ones (every
    ``step``-th sample of the set) or the others."""
    return [i for i in range(n) if ((first + i) % step == step - 1) == held]


class FitSamples:
    """The calibration data without its held-out samples, iterable as often as a compression needs:
    each pass reads ``data`` again and drops every ``step``-th sample (counted over the whole set)."""

    def __init__(self, data, batch_size: int, step: int):
        self.data, self.batch_size, self.step = data, batch_size, step

    def __iter__(self) -> Iterator:
        seen = 0
        for batch in iterate_batches(self.data, self.batch_size):
            n = batch_ops.size(batch)
            kept = _rows(seen, n, self.step, held=False)
            seen += n
            if kept:
                part = batch_ops.select(batch, kept)
                # an iterable's tuple item reads as (inputs, targets): a tuple of inputs travels as one
                yield (part,) if isinstance(part, (tuple, list)) else part


def held_out(data, batch_size: int, step: int, limit: int) -> list:
    """The held-out samples (at most ``limit``), in batches: where unify compares its candidates."""
    chosen, seen, total = [], 0, 0
    for batch in iterate_batches(data, batch_size):
        n = batch_ops.size(batch)
        picked = _rows(seen, n, step, held=True)[:max(limit - total, 0)]
        seen += n
        if picked:
            chosen.append(batch_ops.select(batch, picked))
            total += len(picked)
        if total >= limit:
            break
    if not chosen:
        raise MultinetError("no held-out calibration samples")
    return chosen


def count_samples(data, batch_size: int) -> int:
    return sum(batch_ops.size(b) for b in iterate_batches(data, batch_size))
