"""A batch's Gram products copied to float64 for every consumer and batch (before) or shared in float32 and
added into each consumer's float64 sum (now: ``ConsumerStats.owned``), timed in pairs in one process, in
units of one plain pass. The sums are the same to the bit either way (float32 -> float64 is exact).

    python benchmarks/gram_sums.py zoo-resnet 1024 8 15      # model images size rounds (as scale.py builds them)
    python benchmarks/gram_sums.py resnet50 64 112 3

Each round runs both, in alternating order; every run's removed channels are compared with the first
run's, so "same channels" covers every round of both.
"""
from __future__ import annotations

import torch

import multinet.calib.stats as calib_stats
from paired_runs import arguments, compare

SHARED = calib_stats.BatchGrams._product


def _copied(self, left, right, a, b):
    """The product as it was handed out before: a float64 copy of its own for every consumer and batch."""
    return SHARED(self, left, right, a, b).to(torch.float64, copy=True)


def install(variant: str):
    def use() -> None:
        calib_stats.BatchGrams._product = SHARED if variant == "shared" else _copied
    return use


def main() -> None:
    compare(arguments(__doc__), {name: install(name) for name in ("copies", "shared")}, before="copies",
            after="shared")


if __name__ == "__main__":
    main()
