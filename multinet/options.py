"""The settings every stage of a run reads, in one typed, checked object.

Calibration, solves, the scheduler's curves and masked evaluator, the frontier and the final
evaluation all need the same handful of settings (batch size, conv positions sampled per image,
damping, device, seed, executor). Passed one keyword at a time they drifted: two defaults for
``max_positions``, three meanings of ``device``. Here each has one default and one check, and the
device and executor are resolved once, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import MultinetError

FRONTIER_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RunOptions:
    """``batch_size``: calibration and evaluation batches. ``max_positions``: conv output positions
    (and grid positions of a Linear reading an image channels-last) sampled per image for the
    statistics (None: all; a Linear over a token sequence keeps every token). ``damp``: relative damping of every Gram.
    ``device``: where calibration, solves, curves and evaluation run ("cpu", "cuda", "cuda:1").
    ``seed``: position sampling and random selections. ``eval_samples``: calibration samples that
    measure errors at the final outputs; ``probe_samples``: the most of them an auto schedule's
    amplification probe runs on (each starts from 32 and stops as soon as its standard error is under
    5 % of its value; None: all). ``executor``: None/"local", "ray", "ray:ADDRESS" or an
    executor object. ``frontier_memory`` / ``frontier_dtype``: the cached-input pipeline's frontier
    kept in memory up to that many bytes ("auto": half of the memory available when the run starts; None:
    no limit), then memory-mapped files, stored in that dtype.
    ``compensate_residuals``: in sequential mode, a layer whose output is added to a residual stream is
    re-solved towards its original output plus the drift the stream already carries (the original
    stream minus the compressed one), so errors of earlier layers do not pile up in the stream."""

    batch_size: int = 128
    max_positions: int | None = 256
    damp: float = 1e-6
    device: str = "cpu"
    seed: int = 0
    eval_samples: int = 1024
    probe_samples: int | None = 256
    executor: Any = None
    frontier_memory: int | str | None = "auto"
    frontier_dtype: str = "float32"
    compensate_residuals: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MultinetError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_positions is not None and (not isinstance(self.max_positions, int) or self.max_positions < 1):
            raise MultinetError(f"max_positions must be a positive integer or None, got {self.max_positions!r}")
        if not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise MultinetError(f"damp must be a number >= 0, got {self.damp!r}")
        if not isinstance(self.eval_samples, int) or self.eval_samples < 1:
            raise MultinetError(f"eval_samples must be a positive integer, got {self.eval_samples!r}")
        if self.probe_samples is not None and (not isinstance(self.probe_samples, int) or self.probe_samples < 1):
            raise MultinetError(f"probe_samples must be a positive integer or None, got {self.probe_samples!r}")
        if self.frontier_memory not in (None, "auto") and (
                not isinstance(self.frontier_memory, int) or isinstance(self.frontier_memory, bool)
                or self.frontier_memory < 0):
            raise MultinetError(f"frontier_memory must be >= 0 bytes, 'auto' or None, got {self.frontier_memory!r}")
        if not isinstance(self.compensate_residuals, bool):
            raise MultinetError(f"compensate_residuals must be True or False, got {self.compensate_residuals!r}")
        if self.frontier_dtype not in FRONTIER_DTYPES:
            raise MultinetError(f"unknown frontier_dtype {self.frontier_dtype!r}; choose from "
                                f"{', '.join(FRONTIER_DTYPES)}")

    def resolved(self) -> "RunOptions":
        """The device checked and normalised, the executor built: done once, before any work."""
        from .runtime.devices import resolve_device
        from .runtime.executors import resolve_executor

        return replace(self, device=str(resolve_device(self.device)), executor=resolve_executor(self.executor))

    @classmethod
    def of(cls, options: "RunOptions | None", **settings) -> "RunOptions":
        """``options`` as given, or one built from keyword settings; both at once is ambiguous unless the
        keywords only repeat the defaults or the options' own values (a caller that read its settings from
        ``options`` and passes them on)."""
        if options is None:
            return cls(**settings)
        defaults = {f.name: f.default for f in fields(cls)}
        clash = sorted(k for k, v in settings.items()
                       if not _same(v, defaults[k]) and not _same(v, getattr(options, k)))
        if clash:
            raise MultinetError(f"give these settings inside options= or as keywords, not both: {', '.join(clash)}")
        return options


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)
