"""A conv consumer's statistics as before (rows built in three copies, the cross term from both models'
im2col rows) or now (rows in one copy with their ones column; the cross term X^T (X_ref - X) W_ref from one
conv of the input difference where no position is sampled), timed in pairs in one process, in units of
one plain pass.

    python benchmarks/conv_cross.py zoo-resnet 1024 8 15      # model images size rounds (as scale.py builds them)
    python benchmarks/conv_cross.py resnet50 64 112 3

Each round runs both, in alternating order; every run's removed channels are compared with the first
run's, so "same channels" covers every round of both.
"""
from __future__ import annotations

import math

import torch

import multinet.calib.stats as calib_stats
from multinet.calib.unfold import output_grid, unfold_conv_input
from paired_runs import arguments, compare

CURRENT = (calib_stats.input_rows, calib_stats.BatchGrams._moved_by_conv)


def _rows_in_copies(spec, x, max_positions, gen, dtype=torch.float64, keep_rows=None) -> torch.Tensor:
    """The rows as they were built before: laid out, converted, then a ones column concatenated."""
    if spec.kind == "linear":
        rows = calib_stats._linear_rows(x, max_positions, gen, keep_rows)
    else:
        per_sample = math.prod(output_grid(x, spec.geometry))
        rows = unfold_conv_input(x, spec.geometry, calib_stats._sampled_positions(per_sample, max_positions, gen))
    rows = rows.to(dtype)
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=dtype, device=rows.device)], 1)


def install(variant: str):
    def use() -> None:
        if variant == "conv":
            calib_stats.input_rows, calib_stats.BatchGrams._moved_by_conv = CURRENT
        else:
            calib_stats.input_rows = _rows_in_copies
            calib_stats.BatchGrams._moved_by_conv = lambda *args, **kwargs: None
    return use


def main() -> None:
    compare(arguments(__doc__), {name: install(name) for name in ("rows", "conv")}, before="rows", after="conv")


if __name__ == "__main__":
    main()
