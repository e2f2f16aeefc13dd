import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multinet
from multinet import zoo
from multinet.cli import main


def test_inspect_zoo_model_with_evaluation(capsys):
    assert main(["inspect", "zoo:resnet", "--evaluate", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "blocks.2.downsample.0" in out and "reaches the model output" in out
    assert "10 groups, 9 prunable" in out
    measured = float(out.split("held-out images): ")[1].split()[0])
    assert measured == pytest.approx(zoo.recorded_accuracy("digits")["resnet"], abs=1e-4)


def test_inspect_factory_and_checkpoint(tmp_path, capsys):
    assert main(["inspect", "cli_factories:tiny", "--input-shape", "1,3,8,8"]) == 0
    assert "2 groups, 1 prunable" in capsys.readouterr().out
    from cli_factories import tiny

    path = tmp_path / "w.pt"
    torch.save(tiny().state_dict(), path)
    assert main(["inspect", "cli_factories:tiny", "--input-shape", "1,3,8,8", "--checkpoint", str(path)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["inspect", "nonsense"], "must be zoo:NAME or module.path:factory"),
    (["inspect", "zoo:alexnet"], "unknown zoo model 'alexnet'"),
    (["inspect", "no_such_module:f", "--input-shape", "1,3,8,8"], "cannot import 'no_such_module'"),
    (["inspect", "cli_factories:missing", "--input-shape", "1,3,8,8"], "no callable 'missing'"),
    (["inspect", "cli_factories:not_a_model", "--input-shape", "1,3,8,8"], "not a torch.nn.Module"),
    (["inspect", "cli_factories:tiny"], "--input-shape is required"),
    (["inspect", "cli_factories:tiny", "--input-shape", "1,a,8"], "must be integers"),
    (["inspect", "cli_factories:tiny", "--input-shape", "1,1,8,8"], "do not fit the model at node"),
    (["inspect", "cli_factories:untraceable", "--input-shape", "1,3,8,8"], "cannot trace M at"),
    (["inspect", "cli_factories:tiny", "--input-shape", "1,3,8,8", "--checkpoint", "/nonexistent.pt"], "does not exist"),
])
def test_inspect_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_checkpoint_for_another_architecture(tmp_path, capsys):
    path = tmp_path / "vgg.pt"
    torch.save(zoo.build("vgg").state_dict(), path)
    assert main(["inspect", "zoo:resnet", "--checkpoint", str(path)]) == 2
    assert "does not fit ResNet" in capsys.readouterr().err
    path.write_bytes(b"not a checkpoint")
    assert main(["inspect", "zoo:resnet", "--checkpoint", str(path)]) == 2
    assert "cannot be read as tensors" in capsys.readouterr().err


def test_entry_point_runs_as_a_process():
    result = subprocess.run([sys.executable, "-m", "multinet.cli", "inspect", "zoo:mlp"], capture_output=True, text=True)
    assert result.returncode == 0 and "hidden.0" in result.stdout


def test_compress_command_reports_groups_flops_and_accuracy(capsys):
    assert main(["compress", "zoo:mlp", "--ratio", "0.5", "--calibration", "256", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "hidden.0" in out and "128 -> 64" in out and "kept); params" in out
    before, after = (float(v) for v in out.split("no fine-tuning): ")[1].split()[0:3:2])
    assert after > before - 0.03


@pytest.mark.parametrize("argv, message", [
    (["compress", "zoo:mlp", "--ratio", "1.5"], "--ratio must lie in [0, 1)"),
    (["compress", "zoo:mlp", "--calibration", "0"], "at least 1 sample"),
    (["compress", "zoo:mlp", "--dataset", "cifar"], "unknown dataset"),
    (["compress", "zoo:mlp", "--flops", "1.5"], "must lie in (0, 1)"),
    (["compress", "zoo:mlp", "--flops", "0.5", "--params", "0.5"], "exactly one"),
    (["compress", "zoo:mlp", "--flops", "0.5", "--ratio", "0.3"], "not several"),
    (["compress", "zoo:mlp", "--round-to", "4"], "need a budget"),
    (["compress", "zoo:mlp", "--flops", "0.5", "--ignore", "nope*"], "matches no layer"),
    (["compress", "zoo:mlp", "--plan", "/nonexistent/plan.json"], "no plan at"),
])
def test_compress_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compress_to_a_budget_writes_a_plan_that_reapplies(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    argv = ["compress", "zoo:mlp", "--flops", "0.4", "--calibration", "256", "--quiet"]
    assert main(argv + ["--plan-out", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "auto schedule, flops budget" in out and "plan written to" in out and plan.exists()
    kept = float(out.split("% kept)")[0].split("(")[-1])
    assert kept <= 40.0
    assert main(["compress", "zoo:mlp", "--plan", str(plan), "--calibration", "256", "--quiet"]) == 0
    assert f"({kept}% kept)" in capsys.readouterr().out


def test_compress_saves_a_model_that_inspect_reads(tmp_path, capsys):
    path = tmp_path / "small.mnet"
    assert main(["compress", "zoo:mlp", "--flops", "0.5", "--calibration", "256", "--quiet", "--save", str(path)]) == 0
    assert "model written to" in capsys.readouterr().out and path.exists()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hidden.0" in out and "prunable" in out
    onnx_path = tmp_path / "small.onnx"
    if __import__("importlib").util.find_spec("onnxscript"):
        assert main(["export", str(path), "--out", str(onnx_path)]) == 0 and onnx_path.exists()
    path.write_bytes(b"garbage")
    assert main(["inspect", str(path)]) == 2
    assert "not a multinet model file" in capsys.readouterr().err


# --- the bad-input catalogue: one line, exit 2, no traceback, nothing written, no calibration ---

SCENARIO = str(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml")
FAST = ["--calibration", "64", "--quiet"]


@pytest.fixture(scope="module")
def digits_mnet(tmp_path_factory):
    """A model for 8x8 digits saved as .mnet (outside the test's folder, which must stay unchanged)."""
    from multinet.io import save

    path = tmp_path_factory.mktemp("models") / "mlp8.mnet"
    save(zoo.create("mlp"), path, zoo.example_input("digits", batch=1))
    return path


@pytest.fixture
def no_calibration(monkeypatch):
    """Every calibration entry point counts its calls and fails: a refusal must come before them."""
    import multinet.pipeline.compression as compression
    import multinet.schedule.scheduler as scheduler

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("calibration ran")

    monkeypatch.setattr(scheduler, "one_shot_stats", refuse)
    monkeypatch.setattr(compression, "collect_on", refuse)
    return calls


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("multinet: error: ") and "Traceback" not in err, err
    return lines[0]


CATALOGUE = {
    "--save to a directory": (["compress", "zoo:mlp", *FAST, "--save", "{tmp}"], "is a directory"),
    "--save with an unknown suffix": (["compress", "zoo:mlp", *FAST, "--save", "{tmp}/small.h5"],
                                      "unknown file type '.h5'; use one of .mnet, .onnx, .pt2"),
    "--save under a file": (["compress", "zoo:mlp", *FAST, "--save", "{tmp}/photos/holiday.jpg/m.mnet"],
                            "is a file, not a directory"),
    "--plan-out to a directory": (["compress", "zoo:mlp", "--flops", "0.5", *FAST, "--plan-out", "{tmp}"],
                                  "is a directory"),
    "--removed-out to a directory": (["compress", "zoo:mlp", *FAST, "--removed-out", "{tmp}/photos"],
                                     "is a directory"),
    "--plan is a directory": (["compress", "zoo:mlp", *FAST, "--plan", "{tmp}"], "is a directory"),
    "export --out to a directory": (["export", "zoo:mlp", "--out", "{tmp}"], "is a directory"),
    "--device foo": (["compress", "zoo:mlp", *FAST, "--device", "foo"], "unknown device 'foo'"),
    "--device tpu": (["infer", "zoo:mlp", "--device", "tpu"], "device 'tpu'"),
    "--device cuda:7 on infer": (["infer", "zoo:mlp", "--device", "cuda:7"], "cuda:7"),
    "a model path that does not import": (["compress", "no_such_module:build", *FAST], "cannot import 'no_such_module'"),
    "a module without the factory": (["compress", "cli_factories:missing", *FAST], "no callable 'missing'"),
    "infer with the wrong input shape": (["infer", "{mnet}", "--dataset", "mnist"],
                                         "are 1x28x28 per sample, but the model expects 1x8x8"),
    "an impossible budget": (["compress", "zoo:mlp", "--flops", "0.001", *FAST], "is below"),
    "run --out to a foreign folder": (["run", SCENARIO, "--out", "{tmp}/photos", "--quiet"],
                                      "is not empty and is not a multinet run directory"),
    "run --resume --out to a foreign folder": (["run", SCENARIO, "--out", "{tmp}/photos", "--resume", "--quiet"],
                                               "is not empty and is not a multinet run directory"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(case, tmp_path, monkeypatch, capsys, digits_mnet, no_calibration):
    argv, message = CATALOGUE[case]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"not yours to overwrite")
    monkeypatch.chdir(tmp_path)  # anything written to a default place would land here too
    before = _tree(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{mnet}", str(digits_mnet)) for a in argv]
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert _tree(tmp_path) == before and no_calibration == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["compress", "zoo:mlp", *FAST], ["infer", "zoo:mlp"]])
def test_cuda_without_a_gpu(command, tmp_path, monkeypatch, capsys, no_calibration):
    monkeypatch.chdir(tmp_path)
    assert main(command + ["--device", "cuda"]) == 2
    assert "no CUDA GPU" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [] and no_calibration == []


def test_run_on_a_device_this_machine_lacks_writes_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", SCENARIO, "--out", str(out), "--set", "runtime.device=tpu", "--quiet"]) == 2
    assert "device 'tpu'" in _one_error_line(capsys.readouterr().err) and not out.exists()


def test_ctrl_c_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import multinet.pipeline.compression as compression

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compression, "compress", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["compress", "zoo:mlp", *FAST, "--save", "small.mnet"]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith("multinet: error: interrupted")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_saving_leaves_no_half_written_file(tmp_path, monkeypatch, capsys):
    """The model file is complete on disk under a temporary name when the rename is interrupted."""
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    assert main(["compress", "zoo:mlp", *FAST, "--save", str(tmp_path / "small.mnet")]) == 2
    assert "interrupted" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_an_internal_error_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import multinet.pipeline.compression as compression

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nspread over lines")

    monkeypatch.setattr(compression, "compress", broken)
    monkeypatch.delenv("MULTINET_TRACEBACK", raising=False)
    argv = ["compress", "zoo:mlp", *FAST]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "internal error: RuntimeError: a bug spread over lines" in line and "--traceback" in line
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv + ["--traceback"])
    monkeypatch.setenv("MULTINET_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)


def test_a_run_directory_is_marked_and_only_resume_continues_it(tmp_path, capsys):
    """The marker makes a folder multinet wrote a run: refused without --resume, continued with it."""
    from multinet.scenario.runner import RUN_MARKER

    scenario = tmp_path / "tiny.yaml"
    scenario.write_text("name: tiny\nmodels: [{name: mlp, model: 'zoo:mlp'}]\ndata: {calibration: 64}\n"
                        "steps: [{compress: {ratio: 0.5}}]\noutputs: {save_model: false, plots: false}\n")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 0
    assert (out / RUN_MARKER).is_file() and (out / "report.json").is_file()
    capsys.readouterr()
    assert main(["run", str(scenario), "--out", str(out), "--quiet"]) == 2
    assert "pass --resume" in _one_error_line(capsys.readouterr().err)
    assert main(["run", str(scenario), "--out", str(out), "--resume", "--quiet"]) == 0


def test_compress_a_submodule_of_a_model_that_does_not_trace(tmp_path, capsys):
    path = tmp_path / "features.mnet"
    argv = ["compress", "cli_factories:gated", "--ratio", "0.5", "--calibration", "128", "--quiet"]
    assert main(argv) == 2
    assert "cannot trace" in capsys.readouterr().err
    assert main(argv + ["--submodule", "features", "--save", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table's title wraps
    assert "submodule `features` only" in out and "16 -> 8" in out and "test accuracy on digits" in out
    assert "put it in place of the model's `features`" in out
    features = multinet.load(path)
    assert features(torch.rand(3, 1, 8, 8)).shape == (3, 16)
    assert main(argv + ["--submodule", "neck"]) == 2
    assert "no submodule 'neck'" in capsys.readouterr().err
