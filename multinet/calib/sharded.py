"""Calibration statistics from shards of the data, on any executor.

Gram sums are additive: each job accumulates its share of the batches and the driver adds the
partial sums. Batches keep their global index, so sub-sampled conv positions — and therefore the
statistics — are the same whichever executor ran them, to float tolerance.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict

import torch

from .stats import ConsumerSpec, ConsumerStats, collect, iterate_batches, warn_few_rows


def _shard_job(job: dict) -> dict[str, tuple]:
    """Runs on a worker: rebuild the model(s) from bytes, accumulate statistics for a shard."""
    from ..runtime.executors import fetch
    from ..io import from_bytes

    model = from_bytes(fetch(job["model"]))
    reference = from_bytes(fetch(job["reference"])) if job["reference"] is not None else None
    specs = [ConsumerSpec(**s) for s in job["specs"]]
    ref_specs = [ConsumerSpec(**s) for s in job["reference_specs"]] if job["reference_specs"] else None
    device = job["device"]
    if job.get("gpu") and torch.cuda.is_available():
        device = "cuda"  # a GPU job on a GPU node accumulates there

    def run(on: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-shard row counts are not the run's: the driver checks the total
            return collect(model, specs, job["batches"], reference=reference, reference_specs=ref_specs,
                           batch_size=job["batch_size"], max_positions=job["max_positions"], device=on,
                           seed=job["seed"], first_batch=job["first_batch"], warn=False,
                           precision=getattr(torch, job.get("precision", "float64")))

    try:
        stats = run(device)
    except torch.cuda.OutOfMemoryError:  # too big for this GPU: the same shard on the CPU
        torch.cuda.empty_cache()
        stats = run("cpu")
    return {k: v.as_tuple() for k, v in stats.items()}


def collect_on(executor, model, specs: list[ConsumerSpec], data, reference=None, reference_specs=None,
               batch_size: int = 128, max_positions: int | None = None, device: str = "cpu", seed: int = 0,
               precision: torch.dtype = torch.float64, outputs=None) -> dict[str, ConsumerStats]:
    """``collect`` split over ``executor.workers`` jobs (the plain ``collect`` for one worker).
    ``outputs``: ``collect``'s callback for the model's outputs, called only where the pass runs in this
    process (sharded jobs return statistics alone)."""
    if executor is None or getattr(executor, "workers", 1) <= 1 and getattr(executor, "name", "local") == "local":
        return collect(model, specs, data, reference=reference, reference_specs=reference_specs,
                       batch_size=batch_size, max_positions=max_positions, device=device, seed=seed,
                       precision=precision, outputs=outputs)
    from ..io import to_bytes

    batches = list(iterate_batches(data, batch_size))
    n = max(1, min(executor.workers, len(batches)))
    bounds = [round(i * len(batches) / n) for i in range(n + 1)]
    model_ref = executor.put(to_bytes(model))
    ref_ref = executor.put(to_bytes(reference)) if reference is not None else None
    jobs = [dict(model=model_ref, reference=ref_ref, specs=[asdict(s) for s in specs],
                 reference_specs=[asdict(s) for s in reference_specs] if reference_specs else None,
                 batches=batches[lo:hi], first_batch=lo, batch_size=batch_size, max_positions=max_positions,
                 device=device, seed=seed, gpu=getattr(executor, "gpu", False),
                 precision=str(precision).removeprefix("torch."))
            for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    total: dict[str, ConsumerStats] = {}
    for part in executor.map(_shard_job, jobs):
        for name, fields in part.items():
            stats = ConsumerStats(*fields)
            if name in total:
                total[name].add(stats)
            else:
                total[name] = stats
    warn_few_rows(total)
    return total
