"""What the user asks for: one global budget, plus constraints on where channels may go."""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..errors import MultinetError
from ..graph import ChannelGraph
from ..graph.dropping import droppable, is_residual_stream
from ..pipeline.grouped_conv import removal_step


class BudgetError(MultinetError):
    """A budget that is malformed or cannot be met."""


@dataclass(frozen=True)
class Budget:
    """Keep at most ``flops`` (or ``params``) of the original model, or run within ``latency_ms``.

    Exactly one of ``flops``, ``params`` (fractions in (0, 1)) and ``latency_ms`` (milliseconds per
    batch of ``latency_batch`` on ``device``, median after warm-up, met within ``latency_tolerance``).
    ``round_to``: kept channel counts are multiples of it (or the whole group), so kernels really
    get faster. ``ignore``: layer names or glob patterns whose output channels stay. ``min_channels``:
    channels every group keeps, or {group id: channels}; by default 1, or 0 for a group whose
    every reader also reads another model's channels (a MultiNet bridge), which may then vanish.
    ``residual_streams=False`` leaves groups tied by residual additions whole. ``output_weights``: one
    positive weight per model output (a MultiNet: per member output, in member order) in the final-output
    error the schedule minimises; by default every output counts equally. Raising one output's weight
    moves the removals away from what it depends on. ``residual_branches=True``: a group whose every
    reader adds its output to a residual stream may lose all its channels, and the branch then goes
    whole (its readers become constants; the block is its skip connection; see graph/dropping.py).
    """

    flops: float | None = None
    params: float | None = None
    latency_ms: float | None = None
    device: str | None = None  # where latency is measured; None: the compression run's device
    latency_batch: int = 1
    latency_tolerance: float = 0.05
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    min_channels: int | Mapping[int, int] | None = None
    residual_streams: bool = True
    output_weights: tuple[float, ...] | None = None
    residual_branches: bool = False

    def __post_init__(self):
        given = [k for k in ("flops", "params", "latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise BudgetError("give exactly one budget: flops=, params= (fractions of the original) or latency_ms=")
        for key in ("flops", "params"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise BudgetError(f"{key} budget is the fraction of the original to keep and must lie in (0, 1), "
                                  f"got {value!r}")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise BudgetError(f"latency_ms must be positive, got {self.latency_ms!r}")
        if not isinstance(self.latency_batch, int) or self.latency_batch < 1:
            raise BudgetError(f"latency_batch must be a positive integer, got {self.latency_batch!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise BudgetError(f"round_to must be a positive integer, got {self.round_to!r}")
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        mins = (self.min_channels.values() if isinstance(self.min_channels, Mapping)
                else [] if self.min_channels is None else [self.min_channels])
        if any(not isinstance(m, int) or m < 0 for m in mins):
            raise BudgetError(f"min_channels must be non-negative integers, got {self.min_channels!r}")
        if self.output_weights is not None:
            weights = tuple(self.output_weights)
            if not weights or any(not isinstance(w, (int, float)) or not 0 < w < float("inf") for w in weights):
                raise BudgetError(f"output_weights must be positive numbers, one per model output, got "
                                  f"{self.output_weights!r}")
            object.__setattr__(self, "output_weights", tuple(float(w) for w in weights))
        if not isinstance(self.residual_branches, bool):
            raise BudgetError(f"residual_branches must be True or False, got {self.residual_branches!r}")
        if not 0 < self.latency_tolerance < 1:
            raise BudgetError(f"latency_tolerance must lie in (0, 1), got {self.latency_tolerance!r}")

    @property
    def metric(self) -> str:
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ignore"] = list(self.ignore)
        if isinstance(self.min_channels, Mapping):
            out["min_channels"] = {str(k): v for k, v in self.min_channels.items()}
        return out

    def check_device(self) -> None:
        if self.latency_ms is None or self.device is None:
            return
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BudgetError(f"latency budget on {self.device!r}, but this machine has no CUDA device; "
                              f"measure on the target device or use device='cpu'")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BudgetError(f"latency budget on {self.device!r}, but only {torch.cuda.device_count()} CUDA devices")
        if dev.type not in ("cpu", "cuda"):
            raise BudgetError(f"latency budgets are measured on 'cpu' or 'cuda', got {self.device!r}")


def schedulable_groups(graph: ChannelGraph, budget: Budget) -> dict[int, list[int]]:
    """Each group the scheduler may shrink -> its allowed removal counts (ascending, from 0)."""
    ignored = _ignored_groups(graph, budget.ignore)
    out = {}
    for group in graph.prunable_groups:
        if group.id in ignored or (not budget.residual_streams and is_residual_stream(graph, group)):
            continue
        step = removal_step(group)  # grouped convs: multiples of this (equal counts per conv group)
        if step is None:
            continue
        mins = budget.min_channels
        can_vanish = (droppable(graph, group, branches=budget.residual_branches)
                      and budget.metric != "latency")  # timing needs surgery
        default = 0 if can_vanish else 1
        floor = mins.get(group.id, default) if isinstance(mins, Mapping) else default if mins is None else mins
        if not can_vanish:
            floor = max(floor, len(group.pieces), 1)  # each piece of a split keeps a channel
        kept = [n for n in range(group.size - 1, floor - 1, -1) if n % budget.round_to == 0 and n % step == 0]
        if kept:
            out[group.id] = [0] + [group.size - n for n in kept]
    if isinstance(budget.min_channels, Mapping):
        unknown = set(budget.min_channels) - {g.id for g in graph.groups}
        if unknown:
            raise BudgetError(f"min_channels names groups that do not exist: {sorted(unknown)}")
    return out


def _ignored_groups(graph: ChannelGraph, patterns: tuple[str, ...]) -> set[int]:
    layers = list(graph.analysis.layers)
    out = set()
    for pattern in patterns:
        matched = [name for name in layers if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise BudgetError(f"ignore pattern {pattern!r} matches no layer; layers are e.g. {', '.join(layers[:5])}")
        for name in matched:
            group = graph.group_of_layer(name)
            if group is not None:
                out.add(group.id)
    return out
