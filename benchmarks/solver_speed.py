"""REAP's inverse form and Gram-Schmidt form vs brute-force greedy least squares.

    python benchmarks/solver_speed.py [--steps 4]

Brute force: at every step, one least-squares solve (normal equations, Cholesky) per remaining
candidate. All three run on the same statistics in this process; the table shows wall times,
the speed-up of REAP over brute force, and whether the removal sequences are identical.
"""
from __future__ import annotations

import argparse
import time

import torch

from multinet.solve import reap_greedy, reap_greedy_gs
from multinet.solve.problem import blocked_columns, prepare_gram


def brute_force(gram: torch.Tensor, weight: torch.Tensor, block: int, n_remove: int, damp: float) -> list[int]:
    g, _ = prepare_gram(gram, damp)
    w = weight.double()
    cols = blocked_columns(len(g) // block, block)
    alive = list(range(len(cols)))
    removed = []
    for _ in range(n_remove):
        best = None
        for c in alive:
            keep = torch.cat([cols[a] for a in alive if a != c])
            # residual energy of the best fit of X W from the kept columns: w^T G w - b^T G_kk^-1 b
            rhs = g[keep] @ w
            chol = torch.linalg.cholesky(g[keep][:, keep])
            sol = torch.cholesky_solve(rhs, chol)
            err = float((w * (g @ w)).sum() - (rhs * sol).sum())
            if best is None or err < best[0]:
                best = (err, c)
        alive.remove(best[1])
        removed.append(best[1])
    return removed


def problem(channels: int, block: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = channels * block
    x = torch.randn(4 * m, m, generator=gen, dtype=torch.float64)
    x = x @ (torch.eye(m, dtype=torch.float64) + 0.2 * torch.randn(m, m, generator=gen, dtype=torch.float64) / m ** 0.5)
    return x.T @ x, torch.randn(m, d, generator=gen, dtype=torch.float64)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="channels removed (brute force is slow)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cases = [("Linear", n, 1, n) for n in (64, 128, 256)] + [("Conv 3x3", c, 9, c) for c in (32, 64, 128)]
    print(f"{'layer':9s} {'C':>4s} {'cols':>5s} {'steps':>5s} {'brute s':>9s} {'REAP s':>8s} {'GS s':>8s} "
          f"{'REAP x':>8s} {'same order':>10s}")
    for kind, channels, block, d in cases:
        gram, weight = problem(channels, block, d)
        steps = args.steps
        reference, t_brute = timed(lambda: brute_force(gram, weight, block, steps, 1e-6))
        inverse, t_reap = timed(lambda: reap_greedy(gram, weight, steps, block=block))
        gs, t_gs = timed(lambda: reap_greedy_gs(gram, weight, steps, block=block, chunk=16))
        same = inverse.removed == reference and gs.removed == reference
        print(f"{kind:9s} {channels:4d} {channels * block:5d} {steps:5d} {t_brute:9.3f} {t_reap:8.4f} {t_gs:8.3f} "
              f"{t_brute / t_reap:8.0f} {'yes' if same else 'NO':>10s}", flush=True)
    # the whole greedy sequence, where brute force is out of reach
    print("\nwhole sequence (remove half the channels), REAP inverse form:")
    for kind, channels, block, d in cases:
        gram, weight = problem(channels, block, d)
        _, t = timed(lambda: reap_greedy(gram, weight, channels // 2, block=block))
        print(f"{kind:9s} C={channels:4d}: {t:.3f} s")


if __name__ == "__main__":
    main()
