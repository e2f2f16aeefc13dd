"""The calibration rows' NaN/Inf check as a mask as large as the rows (before a2a81ba) or by their sum
(``solve.problem.all_finite``), timed in pairs in one process, in units of one plain pass.

    python benchmarks/finite_check.py zoo-resnet 1024 8 15      # model images size rounds (as scale.py builds them)
    python benchmarks/finite_check.py resnet50 64 112 3

Each round runs both checks, in alternating order; every run's removed channels are compared with the
first run's, so "same channels" covers every round of both.
"""
from __future__ import annotations

import torch

import multinet.calib.stats as calib_stats
from paired_runs import arguments, compare

CHECKS = {"mask": lambda t: bool(torch.isfinite(t).all()), "sum": calib_stats.all_finite}


def install(check: str):
    def use() -> None:
        calib_stats.all_finite = CHECKS[check]
    return use


def main() -> None:
    compare(arguments(__doc__), {name: install(name) for name in CHECKS}, before="mask", after="sum")


if __name__ == "__main__":
    main()
