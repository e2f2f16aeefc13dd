"""Outputs a person and a pipeline can use: file modes, named and batch-dynamic exports, --help,
--version, progress in logs, the removed channels, a short repr."""
import argparse
import io
import json
import os
import stat

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import data, zoo
from multinet.cli import build_parser, main
from multinet.io.files import write_atomic
from multinet.runtime.progress import Bar

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:64]


@pytest.fixture
def umask():
    """Set a umask for one test and put the old one back."""
    previous = os.umask(0o022)
    os.umask(previous)

    def use(mask):
        os.umask(mask)
    yield use
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mask, mode):
    umask(mask)
    write_atomic(tmp_path / "out.json", "{}")
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left beside it


def test_saved_model_is_readable_by_others(tmp_path, calib, umask):
    umask(0o022)
    path = multinet.save(zoo.create("mlp"), tmp_path / "m.mnet", calib[:1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _pair(calib):
    net = multinet.MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, calib[:1])
    return net, calib[:1]


def test_onnx_outputs_are_named_after_the_member_models_and_batch_is_dynamic(tmp_path, calib):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net, example = _pair(calib)
    session = ort.InferenceSession(str(multinet.export(net, example, tmp_path / "pair.onnx")))
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["a", "b"]
    assert all(isinstance(o.shape[0], str) for o in session.get_outputs())  # a symbolic batch dimension
    x = calib[:5]  # exported from a batch of 1, run on 5
    outs = dict(zip(["a", "b"], session.run(None, {"input": x.numpy()})))
    with torch.no_grad():
        ref = net(x)
    for name in ("a", "b"):
        torch.testing.assert_close(torch.from_numpy(outs[name]), ref[name], atol=1e-4, rtol=1e-4)
    plain = ort.InferenceSession(str(multinet.export(zoo.create("mlp"), example, tmp_path / "mlp.onnx")))
    assert [o.name for o in plain.get_outputs()] == ["output"]


def test_torch_export_has_a_dynamic_batch(tmp_path, calib):
    net, example = _pair(calib)
    program = torch.export.load(multinet.export(net, example, tmp_path / "pair.pt2", format="torch.export"))
    with torch.no_grad():
        for batch in (1, 7):
            x = calib[:batch]
            got, ref = program.module()(x), net(x)
            for name in ("a", "b"):
                torch.testing.assert_close(got[name], ref[name])


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".mnet"])
def test_compress_save_writes_the_format_its_suffix_names(tmp_path, capsys, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxscript")
    path = tmp_path / f"small{suffix}"
    assert main(["compress", "zoo:mlp", "--ratio", "0.5", "--calibration", "64", "--quiet", "--save", str(path)]) == 0
    assert f"model written to {path}" in capsys.readouterr().out
    x = data.load("digits").test_x[:3]
    if suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path))
        assert session.run(None, {"input": x.numpy()})[0].shape == (3, 10)
    elif suffix == ".pt2":
        assert torch.export.load(path).module()(x).shape == (3, 10)
    else:
        assert multinet.load(path)(x).shape == (3, 10)


def test_compress_without_save_says_nothing_was_kept(capsys):
    assert main(["compress", "zoo:mlp", "--ratio", "0.5", "--calibration", "64", "--quiet"]) == 0
    assert "model not saved (add --save FILE.mnet" in capsys.readouterr().out


def test_removed_channels_are_written_and_shown(tmp_path, capsys):
    path = tmp_path / "removed.json"
    argv = ["compress", "zoo:mlp", "--ratio", "0.25", "--calibration", "64", "--quiet", "--removed-out", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"removed channels written to {path}" in out
    assert "removed" in next(line for line in out.splitlines() if "producers" in line)  # a table column
    record = json.loads(path.read_text())
    assert record["model"] == "zoo:mlp" and record["method"] == "reap"
    (first, second) = record["groups"]
    assert first["producers"] == ["hidden.0"] and first["channels_before"] == 128 and first["kept"] == 96
    assert len(first["removed"]) == 32 == len(set(first["removed"])) and max(first["removed"]) < 128
    assert second["kept"] + len(second["removed"]) == second["channels_before"]


def test_compress_result_repr_is_a_summary(calib):
    result = multinet.compress(zoo.create("mlp"), calib, ratio=0.5)
    text = repr(result)
    assert text.startswith("CompressResult(method='reap'") and "FLOPs 17,024 -> " in text and "2 groups" in text
    assert "\n" not in text and "forward" not in text and len(text) < 300
    assert result.removed_channels()[0]["removed"] == result.groups[0].removed


def _parsers() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [parser, *commands.choices.values()]


def test_every_option_has_help_and_defaults_are_shown():
    parsers = _parsers()
    assert len(parsers) == 7  # multinet and its six commands
    for parser in parsers:
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
    compress_help = " ".join(next(p for p in parsers if p.prog.endswith("compress")).format_help().split())
    assert "(default: 1024)" in compress_help and "(default: reap)" in compress_help
    assert "--threads" in compress_help and "not already busy" in compress_help
    assert "(default: None)" not in compress_help and "(default: False)" not in compress_help


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"multinet {multinet.__version__}"


def test_threads_are_set_before_the_work(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["inspect", "zoo:mlp", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as info:
        main(["inspect", "zoo:mlp", "--threads", "0"])
    assert info.value.code == 2


class _Clock:
    """A clock the test moves by hand (no test reads real time)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_plain_throttled_lines():
    stream, clock = io.StringIO(), _Clock()
    bar = Bar(True, 8, "reap: groups", stream=stream, interval=5.0, clock=clock)
    for step in range(8):
        clock.now = step * 2.0  # a group every 2 s: a line at 0, 6 and 12 s
        bar.advance()
    clock.now = 15.0
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["reap: groups: 1/8 (12%), 0.0 s", "reap: groups: 4/8 (50%), 6.0 s, ETA 6.0 s",
                     "reap: groups: 7/8 (88%), 12.0 s, ETA 1.7 s", "reap: groups: 8/8 (100%) done, 15.0 s"]
    quiet = io.StringIO()
    off = Bar(False, 8, "reap: groups", stream=quiet)
    off.advance()
    off.close()
    assert quiet.getvalue() == ""


def test_cli_progress_shows_in_a_log_unless_quiet(capsys):
    argv = ["compress", "zoo:mlp", "--ratio", "0.5", "--calibration", "64"]
    assert main(argv) == 0
    assert "reap: groups: 2/2 (100%) done" in capsys.readouterr().err  # stderr is no terminal here
    assert main(argv + ["--quiet"]) == 0
    assert "reap: groups" not in capsys.readouterr().err


def test_progress_lines_carry_the_eta_and_what_is_being_worked_on():
    stream, clock = io.StringIO(), _Clock()
    bar = Bar(True, 4, "reap: groups", stream=stream, interval=5.0, clock=clock)
    bar.note("group 0: calibrating conv1")  # the first line: nothing done yet, so no ETA
    clock.now = 10.0
    bar.advance()  # 1 of 4 in 10 s: 30 s to go
    clock.now = 12.0
    bar.note("group 1: calibrating conv2, batch 2/4, 640 samples/s")  # throttled: 2 s after the last line
    clock.now = 16.0
    bar.note("group 1: solving (8 of 16 channels)")
    bar.close()
    assert stream.getvalue().splitlines() == [
        "reap: groups: 0/4 (0%), 0.0 s - group 0: calibrating conv1",
        "reap: groups: 1/4 (25%), 10.0 s, ETA 30.0 s - group 0: calibrating conv1",
        "reap: groups: 1/4 (25%), 16.0 s, ETA 48.0 s - group 1: solving (8 of 16 channels)",
        "reap: groups: 1/4 (25%) done, 16.0 s"]


def test_sequential_compress_reports_each_group_it_calibrates(capsys):
    import multinet
    from multinet import data, zoo

    x = data.load("digits").train_x[:96]
    multinet.compress(zoo.create("vgg"), x, ratio=0.25, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "group 0" in err and "done" in err


def test_batches_of_other_image_sizes_join_as_one_row_and_budgets_run_on_them():
    """A fully convolutional model calibrated on batches of different image sizes (as a detector's backbone
    gets them): its outputs cannot be stacked a row per sample, so each becomes one row of all its numbers,
    errors over them stay exact, and a budget's schedule runs (it measured nothing per sample)."""
    from multinet.schedule.oneshot import join_outputs, output_parts

    a, b = torch.randn(2, 3, 4, 4), torch.randn(3, 3, 5, 6)
    same = join_outputs([output_parts(a), output_parts(a)])
    assert same[0].shape == (4, 48)
    mixed = join_outputs([output_parts(a), output_parts(b)])
    assert mixed[0].shape == (1, 2 * 48 + 3 * 90)
    assert float((mixed[0] ** 2).sum()) == pytest.approx(float((a.double() ** 2).sum() + (b.double() ** 2).sum()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    data = [torch.randn(8, 3, 8, 8), torch.randn(8, 3, 10, 6), torch.randn(8, 3, 6, 12)]
    for mode in ("sequential", "oneshot"):
        result = multinet.compress(model, data, budget=multinet.Budget(flops=0.5), mode=mode, max_positions=16)
        assert result.flops_after <= 0.5 * result.flops_before + 1
        with torch.no_grad():
            expected = sum(float(((result.model(x) - model(x)) ** 2).sum()) for x in data) / sum(
                float((model(x) ** 2).sum()) for x in data)
        assert result.plan.measured_error == pytest.approx(expected, rel=1e-3)
