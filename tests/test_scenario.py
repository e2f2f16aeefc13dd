"""Scenario runs end to end, resume, and a catalogue of bad input (one line, exit 2, no half-written files)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import multinet
from multinet import data, zoo
from multinet.cli import main

SCENARIOS = Path(__file__).parent.parent / "scenarios"
SMALL = ["--set", "data.calibration=192", "--quiet"]


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


@pytest.mark.parametrize("name", ["quickstart", "unify_pair", "budget_residual"])
def test_shipped_scenarios_run_and_their_models_reload(name, tmp_path, split, capsys):
    out = tmp_path / name
    assert main(["run", str(SCENARIOS / f"{name}.yaml"), "--out", str(out), *SMALL]) == 0
    assert f"run directory: {out}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for f in ("scenario.yaml", "report.md", "report.png"):
        assert (out / f).exists()
    final = report["accuracy"]["final"]
    saved = [Path(p) for p in report["saved"]]
    assert saved and all(p.exists() for p in saved)
    model = multinet.load(saved[0])
    with torch.no_grad():
        outs = model(split.test_x)
    outs = outs if isinstance(outs, dict) else {saved[0].stem: outs}
    for key, logits in outs.items():  # the reloaded model gives exactly the accuracy the run reported
        assert data.accuracy_of(logits, split.test_y) == pytest.approx(final[key])
    original = report["accuracy"]["original"]
    assert all(final[k] > original[k] - 0.05 for k in final)
    assert main(["report", str(out), "--no-plot"]) == 0
    assert "## Step" in capsys.readouterr().out


def test_resume_skips_finished_steps(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(SCENARIOS / "quickstart.yaml"), "--out", str(out), *SMALL]
    assert main(args) == 0
    first = json.loads((out / "report.json").read_text())
    # as if the run had been killed during step 3: the progress record points after step 2
    progress = json.loads((out / "state" / "progress.json").read_text())
    progress["steps"] = [1, 2]
    progress["files"] = {"resnet": "step2-resnet.mnet"}
    progress["report"]["steps"] = progress["report"]["steps"][:2]
    (out / "state" / "progress.json").write_text(json.dumps(progress))
    for f in ("report.json", "resnet.mnet"):
        (out / f).unlink()
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [s["seconds"] for s in again["steps"][:2]] == [s["seconds"] for s in first["steps"][:2]]  # not rerun
    assert again["accuracy"]["final"] == first["accuracy"]["final"]
    assert main(["run", str(SCENARIOS / "budget_residual.yaml"), "--out", str(out), "--resume", *SMALL]) == 2
    assert "different scenario" in capsys.readouterr().err


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


BASE = """name: t
models:
  - name: m
    model: zoo:mlp{extra}
data:
  calibration: {calib}
steps:
  - compress:
      {budget_key}: {{flops: {flops}}}
"""


UNIFY = """name: u
models:
  - {{name: a, model: "zoo:mlp"}}
  - {{name: b, model: "zoo:mlp"}}
data:
  calibration: 64
steps:
  - unify:
      budget: {{flops: 0.5}}
      member_weights: {weights}
"""


def _case(tmp_path, extra="", calib="64", budget_key="budget", flops="0.5"):
    return _write(tmp_path, BASE.format(extra=extra, calib=calib, budget_key=budget_key, flops=flops))


@pytest.mark.parametrize("make, message", [
    (lambda t: _case(t, budget_key="budgt"), "s.yaml:9: unknown key `steps.0.compress.budgt`; did you mean 'budget'?"),
    (lambda t: _case(t, calib="many"), "s.yaml:6: `data.calibration`"),
    (lambda t: _case(t, flops="1.5"), "s.yaml:9: `steps.0.compress.budget.flops`: Input should be less than 1"),
    (lambda t: _case(t, extra="\n    checkpoint: /nonexistent/w.pt"), "does not exist"),
    (lambda t: _case(t, extra="\n    weights: w.pt"), "unknown key `models.0.weights`"),
    (lambda t: _write(t, "models: [\n"), "not valid YAML"),
    (lambda t: t / "missing.yaml", "no scenario file"),
    (lambda t: _write(t, UNIFY.format(weights="{a: -1}")), "`steps.0.unify.member_weights.a`: Input should be greater than 0"),
    (lambda t: _write(t, UNIFY.format(weights="{c: 2}")), "member_weights names unknown models ['c']"),
    (lambda t: _write(t, UNIFY.format(weights="{a: 1}\n      speed_check: 0")),
     "`steps.0.unify.speed_check`: must be true, false or a batch size (a whole number >= 1) (got 0)"),
    (lambda t: _write(t, BASE.format(extra="", calib="64", budget_key="budget", flops="0.5").replace(
        "compress:\n", "compress:\n      skip_links: true\n").replace("budget: {flops: 0.5}", "ratio: 0.5")),
     "skip_links need a flops or params budget"),
    (lambda t: _write(t, UNIFY.format(weights="{a: 1}") + "  - compress:\n      budget: {flops: 0.5}\n"
                                                          "      skip_links: true\n"),
     "compress.skip_links after a unify step"),
])
def test_bad_scenarios_exit_2_with_one_line(make, message, tmp_path, capsys):
    path = make(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(out.glob("*.mnet")) and not (out / "report.json").exists()


def test_bad_checkpoint_model_file_output_dir_and_override(tmp_path, capsys):
    wrong = tmp_path / "vgg.pt"
    torch.save(zoo.build("vgg").state_dict(), wrong)
    corrupted = tmp_path / "broken.mnet"
    corrupted.write_bytes(b"not a model")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (lambda: _case(tmp_path, extra=f"\n    checkpoint: {wrong}"), [], "does not fit MLP"),
        (lambda: _write(tmp_path, BASE.format(extra="", calib=64, budget_key="budget", flops=0.5)
                        .replace("zoo:mlp", str(corrupted))), [], "not a multinet model file"),
        (lambda: _case(tmp_path), ["--out", str(blocker / "sub")], "cannot write the run directory"),
        (lambda: _case(tmp_path), ["--set", "data.calibration"], "must look like key.path=value"),
        (lambda: _case(tmp_path), ["--set", "steps.3.compress.ratio=0.5"], "no list entry '3'"),
    ]
    for make, extra, message in cases:
        args = ["run", str(make()), "--quiet", *extra]
        if "--out" not in extra:
            args += ["--out", str(tmp_path / "o")]
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_compress_step_with_skip_links_reports_them(tmp_path, capsys):
    text = BASE.format(extra="", calib="512", budget_key="budget", flops="0.04").replace(
        "compress:\n", "compress:\n      skip_links: true\n")
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, text)), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    step = report["steps"][0]
    assert step["models"]["m"]["skip_links"] == [["head", "hidden.2"]]
    assert step["models"]["m"]["flops_after"] <= 0.04 * step["models"]["m"]["flops_before"]


@pytest.mark.parametrize("key, given, expected", [
    ("fuse_layers", None, True), ("fuse_layers", "false", False),
    ("speed_check", None, True), ("speed_check", "false", False), ("speed_check", "256", 256)])
def test_a_unify_steps_search_keys_reach_unify(tmp_path, monkeypatch, key, given, expected):
    """`unify.fuse_layers` and `unify.speed_check` (default true; speed_check may be the infer batch) are what
    unify gets; the search itself is tested in test_unify.py and test_unify_speed.py."""
    import multinet.scenario.runner as runner

    seen = {}

    def fake_unify(models, calib, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop the run here: only the arguments matter

    monkeypatch.setattr(runner, "unify", fake_unify)
    text = (SCENARIOS / "unify_pair.yaml").read_text().replace(
        "budget: {flops: 0.25}", "budget: {flops: 0.25}\n      " + ("" if given is None else f"{key}: {given}"))
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        main(["run", str(path), "--out", str(tmp_path / "o"), *SMALL])
    assert seen[key] == expected and type(seen[key]) is type(expected)
