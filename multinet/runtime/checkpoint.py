"""Resumable compression runs: the model after every finished group, persisted atomically.

``compress(..., run_dir=DIR)`` writes ``DIR/plan.json`` once a schedule is made and, after each
group, ``DIR/model-N.mnet`` followed by ``DIR/progress.json`` pointing at it (the pointer is
written last, so a run killed at any moment resumes from a complete file). Rerun with the same
arguments and the same ``run_dir``: finished groups are loaded, not recomputed, and the result is
identical. Different arguments are refused rather than mixed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..calib import iterate_batches
from ..errors import MultinetError
from ..io.files import write_atomic
from ..io import load, save, to_bytes


UNIFORM_RUN = "uniform"  # the sub-folder where the uniform plan applied beside the scheduled one checkpoints


def fingerprint(model, data, batch_size: int, **settings) -> str:
    """What makes two runs the same run: the model's bytes, the data, and every setting."""
    h = hashlib.sha256(to_bytes(model))
    if isinstance(data, torch.Tensor):
        h.update(data.detach().cpu().contiguous().numpy().tobytes())
    else:
        for batch in iterate_batches(data, batch_size):
            for t in pytree.tree_leaves(batch):  # every tensor of a tuple or dict batch, in order
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


class RunState:
    def __init__(self, run_dir: str | Path, key: str):
        self.dir = Path(run_dir)
        self.key = key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MultinetError(f"cannot write the run directory {self.dir}: {exc.strerror}") from None
        self.progress = self.dir / "progress.json"
        if self.progress.exists():
            record = json.loads(self.progress.read_text())
            if record.get("key") != key:
                raise MultinetError(f"{self.dir} holds a run with other arguments, model or data; use another "
                                    f"run_dir (or delete it) to start afresh")

    def restore(self):
        """(model or None, finished group ids, reports, surviving outputs) of the last finished group."""
        if not self.progress.exists():
            return None, [], [], {}
        record = json.loads(self.progress.read_text())
        model = load(self.dir / record["model"])
        surviving = {k: torch.tensor(v, dtype=torch.long) for k, v in record["surviving"].items()}
        return model, record["finished"], record["reports"], surviving

    def save_plans(self, plan, alternative=None) -> None:
        """The scheduled plan (and the uniform plan applied beside it, if any), with this run's key:
        plan.json is written last, so its presence says the scheduling finished."""
        write_atomic(self.dir / "plans.json", json.dumps({"key": self.key, "compared": alternative is not None}))
        if alternative is not None:
            (self.dir / UNIFORM_RUN).mkdir(exist_ok=True)
            alternative.save(self.dir / UNIFORM_RUN / "plan.json")
        plan.save(self.dir / "plan.json")

    def load_plans(self):
        """(plan, alternative or None) a stopped run scheduled, or None where it had not finished scheduling.
        Plans another run's arguments made are refused (a run directory from before plans.json: trusted)."""
        from ..schedule import Plan

        if not (self.dir / "plan.json").exists():
            return None
        marker = self.dir / "plans.json"
        record = json.loads(marker.read_text()) if marker.exists() else {"key": self.key, "compared": False}
        if record.get("key") != self.key:
            raise MultinetError(f"{self.dir} holds a run with other arguments, model or data; use another "
                                f"run_dir (or delete it) to start afresh")
        alternative = Plan.load(self.dir / UNIFORM_RUN / "plan.json") if record.get("compared") else None
        return Plan.load(self.dir / "plan.json"), alternative

    def record(self, model, example, finished: list[int], reports: list[dict], surviving: dict) -> None:
        name = f"model-{len(finished)}.mnet"
        save(model, self.dir / name, example)
        body = {"key": self.key, "model": name, "finished": finished, "reports": reports,
                "surviving": {k: v.tolist() for k, v in surviving.items()}}
        write_atomic(self.progress, json.dumps(body))
        for old in self.dir.glob("model-*.mnet"):
            if old.name != name:
                old.unlink(missing_ok=True)
