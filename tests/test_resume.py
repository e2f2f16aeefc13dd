"""A compression run killed mid-way resumes from its run directory: nothing recomputed, same result."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import multinet
import importlib
from multinet import Budget, MultinetError, data, zoo

KILL_AFTER = 3
compress_module = importlib.import_module("multinet.pipeline.compression")  # the module (multinet.compress is the function)


pytestmark = pytest.mark.usefixtures("quiet_calibration")


def _count_solves(monkeypatch) -> list:
    """Group solves on either path: the cached-input pipeline's and the full-pass reference's."""
    calls = []
    sequential = importlib.import_module("multinet.pipeline.sequential")
    for module, name in ((compress_module, "_solve_group"), (sequential, "solve_group")):
        original = getattr(module, name)

        def counting(*args, _original=original, **kwargs):
            calls.append(args[2].id)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return calls


def test_killed_driver_resumes_without_recomputing_and_ends_identical(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, warnings
        warnings.simplefilter("ignore")
        import multinet, torch
        from multinet import Budget, data, zoo
        from multinet.runtime.checkpoint import RunState
        torch.set_num_threads({torch.get_num_threads()})  # as here: float32 GEMMs round by thread count
        record = RunState.record
        def record_then_die(self, *args, **kwargs):
            record(self, *args, **kwargs)
            if len(args[2]) == {KILL_AFTER}:
                os.kill(os.getpid(), signal.SIGKILL)  # the driver dies like a killed job, no cleanup
        RunState.record = record_then_die
        x = data.load("digits").train_x[:256]
        multinet.compress(zoo.create("resnet"), x, budget=Budget(flops=0.5), max_positions=16, run_dir={str(run_dir)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    progress = json.loads((run_dir / "progress.json").read_text())
    assert len(progress["finished"]) == KILL_AFTER and (run_dir / "plan.json").exists()

    x = data.load("digits").train_x[:256]
    calls = _count_solves(monkeypatch)
    resumed = multinet.compress(zoo.create("resnet"), x, budget=Budget(flops=0.5), max_positions=16, run_dir=run_dir)
    n_groups = len([g for g in resumed.plan.groups if g.removed])
    assert len(calls) == n_groups - KILL_AFTER  # finished groups were loaded, not solved again
    assert len(resumed.groups) == n_groups
    calls.clear()
    fresh = multinet.compress(zoo.create("resnet"), x, budget=Budget(flops=0.5), max_positions=16)
    assert len(calls) == n_groups
    with torch.no_grad():
        assert torch.equal(resumed.model(x[:64]), fresh.model(x[:64]))
    assert resumed.flops_after == fresh.flops_after


def test_a_run_directory_refuses_other_arguments(tmp_path):
    x = data.load("digits").train_x[:128]
    multinet.compress(zoo.create("mlp"), x, ratio=0.5, run_dir=tmp_path / "run")
    again = multinet.compress(zoo.create("mlp"), x, ratio=0.5, run_dir=tmp_path / "run")  # finished: all loaded
    assert len(again.groups) == 2
    with pytest.raises(MultinetError, match="holds a run with other arguments"):
        multinet.compress(zoo.create("mlp"), x, ratio=0.3, run_dir=tmp_path / "run")
