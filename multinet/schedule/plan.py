"""A schedule's result: how many channels each group loses and which, in what order, and why.

Saved as JSON next to the compressed model so a run can be inspected, compared and re-applied.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MultinetError
from ..io.files import write_atomic


@dataclass
class GroupPlan:
    group: int
    producers: list[str]
    size: int
    removed: list[int]  # channels to remove, in the order REAP removes them
    layer_error: float  # REAP's error at the group's consumers for this many removals

    @property
    def kept(self) -> int:
        return self.size - len(self.removed)


@dataclass
class Plan:
    schedule: str
    budget: dict
    metric: str  # flops | params | latency
    target: float  # absolute: MACs, parameters or milliseconds
    original: float  # the original model's cost in the same unit
    predicted_cost: float
    predicted_error: float  # relative squared error at the final outputs, as the scheduler estimates it
    groups: list[GroupPlan]
    steps: list[tuple[int, int]]  # (group, channels removed so far) in the order the schedule chose them
    seconds: dict[str, float] = field(default_factory=dict)  # statistics, curves, search, ...
    evaluations: float = 0  # forward passes over all evaluation samples the search needed (probes on a subset count as a fraction)
    measured_cost: float | None = None
    measured_error: float | None = None  # after applying the plan with sequential reconstruction
    # where the scheduled plan's error was too large for the scheduler to rank plans by (see compress):
    # each schedule's plan applied, {schedule: measured error}; this plan is the one with the least
    compared: dict[str, float] = field(default_factory=dict)

    def over_target(self) -> bool:
        """The applied model measures over the target: the cost model can let two groups vanish that
        surgery cannot both remove (a ResNet's skip-link trial at 4 %: 66,812 FLOPs for a 65,930 target)."""
        return self.measured_cost is not None and self.measured_cost > self.target

    def removals(self) -> dict[int, list[int]]:
        return {g.group: list(g.removed) for g in self.groups if g.removed}

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place): a killed run leaves no half plan."""
        write_atomic(path, json.dumps(self.as_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            raw = json.loads(Path(path).read_text())
            groups = [GroupPlan(**g) for g in raw.pop("groups")]
            raw["steps"] = [tuple(s) for s in raw["steps"]]
            return cls(groups=groups, **raw)
        except FileNotFoundError:
            raise MultinetError(f"no plan at {path}") from None
        except IsADirectoryError:
            raise MultinetError(f"plan {path} is a directory; give the plan's JSON file") from None
        except OSError as exc:
            raise MultinetError(f"cannot read the plan {path}: {exc.strerror}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # ValueError: bad JSON or bytes
            raise MultinetError(f"{path} is not a multinet plan: {exc}") from None
