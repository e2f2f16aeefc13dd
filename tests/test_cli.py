import subprocess
import sys

import pytest
import torch

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
