"""Calibration statistics for reconstruction solvers."""
from .stats import ConsumerSpec, ConsumerStats, collect, consumer_specs, first_sample, iterate_batches

__all__ = ["ConsumerSpec", "ConsumerStats", "collect", "consumer_specs", "first_sample", "iterate_batches"]
