"""The user's own models and data from the CLI and scenarios: every source kind, labels optional,
relative paths from the scenario's folder, and one line (exit 2, nothing written) for bad input."""
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import multinet
from multinet.cli import main
from multinet.errors import MultinetError
from multinet.io.images import ImageOptions
from multinet.io.sources import load_target, parse_model_args
from multinet.io.user_data import load_data, read

MODEL_PY = '''
import torch
import torch.nn as nn


def build(width=8, classes=10, channels=3):
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def broken(width=8):
    raise ValueError("no weights for width " + str(width))


def pairs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 3, 8, 8, generator=g), torch.arange(20) % 10


def samples():
    x, y = pairs()
    return torch.utils.data.TensorDataset(x, y)


def batches():
    x, y = pairs()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)


def inputs_only():
    return [t for t in pairs()[0].split(7)]


def nothing_useful():
    return 42
'''
N = 40


@pytest.fixture
def project(tmp_path):
    """A user's folder: model code, a state dict, data in every format."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "model.py").write_text(MODEL_PY)
    torch.manual_seed(0)
    ns = {}
    exec(MODEL_PY, ns)
    torch.save(ns["build"](width=8).state_dict(), root / "sd.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, N)
    np.savez(root / "data.npz", x=x, y=y)
    np.savez(root / "named.npz", inputs=x, labels=y)
    np.savez(root / "only.npz", pictures=x)
    np.save(root / "x.npy", x)
    torch.save(torch.from_numpy(x), root / "t.pt")
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), root / "pair.pt")
    torch.save({"images": torch.from_numpy(x), "targets": torch.from_numpy(y)}, root / "dict.pt")
    _images(root / "photos", sizes=[(8, 8)] * 6, classes=["cat", "dog"])
    _images(root / "flat", sizes=[(8, 8)] * 5)
    return root


def _images(folder: Path, sizes: list, classes: list | None = None, mode: str = "RGB") -> None:
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(sub / f"{i:02d}.png")


@pytest.mark.parametrize("spec, shape, labelled", [
    ("x.npy", (N, 3, 8, 8), False),
    ("data.npz", (N, 3, 8, 8), True),
    ("named.npz", (N, 3, 8, 8), True),
    ("only.npz", (N, 3, 8, 8), False),
    ("t.pt", (N, 3, 8, 8), False),
    ("pair.pt", (N, 3, 8, 8), True),
    ("dict.pt", (N, 3, 8, 8), True),
    ("photos", (6, 3, 8, 8), True),
    ("flat", (5, 3, 8, 8), False),
    ("model.py:pairs", (20, 3, 8, 8), True),
    ("model.py:samples", (20, 3, 8, 8), True),
    ("model.py:batches", (20, 3, 8, 8), True),
    ("model.py:inputs_only", (20, 3, 8, 8), False),
])
def test_each_source_kind_loads(project, spec, shape, labelled):
    x, y = read(spec, base_dir=project)
    assert tuple(x.shape) == shape and x.dtype == torch.float32
    assert (y is not None) == labelled
    if labelled:
        assert y.dtype == torch.int64 and len(y) == len(x)


def test_npz_and_function_give_the_same_samples(project):
    x, y = read("data.npz", base_dir=project)
    assert torch.equal(read("pair.pt", base_dir=project)[0], x)
    assert torch.equal(read("dict.pt", base_dir=project)[1], y)
    a, b = read("model.py:pairs", base_dir=project), read("model.py:batches", base_dir=project)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_image_folder_labels_order_resize_and_normalisation(project):
    x, y = read("photos", base_dir=project)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]  # cat/00, 02, 04 then dog/01, 03, 05
    first = np.asarray(Image.open(project / "photos" / "cat" / "00.png"), dtype=np.float32) / 255
    assert torch.allclose(x[0], torch.from_numpy(first).permute(2, 0, 1))
    opts = ImageOptions.parse("12x16", 1, "0.5", "0.25")
    g, _ = read("photos", base_dir=project, images=opts)
    assert g.shape == (6, 1, 12, 16) and g.min() >= -2 and g.max() <= 2 and g.min() < -1
    _images(project / "grey", [(8, 8)] * 2, mode="L")
    assert read("grey", base_dir=project)[0].shape == (2, 1, 8, 8)  # all single-band: one channel


def test_one_source_is_split_once_and_eval_data_is_used_whole(project):
    a, b = load_data("data.npz", base_dir=project), load_data("data.npz", base_dir=project)
    assert len(a.train_x) == 32 and len(a.test_x) == 8 and torch.equal(a.test_x, b.test_x)
    x, _ = read("data.npz", base_dir=project)
    assert sorted(torch.cat([a.train_x, a.test_x]).flatten(1).sum(1).tolist()) == sorted(x.flatten(1).sum(1).tolist())
    both = load_data("x.npy", eval_spec="data.npz", base_dir=project)
    assert len(both.train_x) == N and len(both.test_x) == N and both.train_y is None and both.num_classes == 10
    assert load_data("digits").num_classes == 10  # built-in names keep working


def test_models_from_a_file_a_module_and_a_state_dict(project, monkeypatch):
    model = load_target("model.py:build", "sd.pt", args={"width": 8}, base_dir=project)
    ns = {}
    exec(MODEL_PY, ns)
    reference = ns["build"](width=8)
    reference.load_state_dict(torch.load(project / "sd.pt"))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), reference.eval()(x))
    monkeypatch.syspath_prepend(str(project))
    assert load_target("model:build", args={"width": 4, "classes": 3})(x).shape == (2, 3)
    assert parse_model_args(["width=8", "weights=None", "scale=0.5", "name=resnet", "pretrained=false"]) == {
        "width": 8, "weights": None, "scale": 0.5, "name": "resnet", "pretrained": False}


def test_compress_own_model_on_own_data_end_to_end(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["compress", "proj/model.py:build", "--model-arg", "width=8", "--checkpoint", "proj/sd.pt", "--data",
            "proj/data.npz", "--ratio", "0.5", "--save", "out.mnet", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    before, after = (float(v) for v in out.split("no fine-tuning): ")[1].split()[0:3:2])
    assert "test accuracy on proj/data.npz (8 held-out samples" in out and "8 -> 4" in out
    saved = multinet.load("out.mnet")
    x = torch.randn(3, 3, 8, 8)
    assert saved(x).shape == (3, 10)
    assert main(["infer", "out.mnet", "--data", "proj/data.npz"]) == 0
    assert f"on {N} samples of proj/data.npz" in capsys.readouterr().out


def test_without_labels_compress_reports_agreement_with_the_original(project, capsys):
    argv = ["compress", f"{project}/model.py:build", "--checkpoint", str(project / "sd.pt"), "--data",
            str(project / "flat"), "--eval-data", str(project / "x.npy"), "--image-size", "8", "--flops", "0.6",
            "--quiet"]
    assert main(argv) == 0
    line = next(v for v in capsys.readouterr().out.splitlines() if v.startswith("no labels in"))
    assert f"agreement with the original model ({N} held-out samples" in line
    assert 0 <= float(line.split("top-1 ")[1].split(",")[0]) <= 1 and "relative output error" in line
    assert main(["inspect", f"{project}/model.py:build", "--data", str(project / "x.npy")]) == 0  # shape from the data
    assert "input (1, 3, 8, 8)" in capsys.readouterr().out


SCENARIO = """name: mine
models:
  - name: net
    model: model.py:build
    args: {width: 8}
    checkpoint: sd.pt
data:
  source: data.npz
  calibration: 32
steps:
  - evaluate: {}
  - compress: {ratio: 0.5}
  - evaluate: {}
"""


def test_scenario_paths_resolve_from_the_scenario_folder(project, tmp_path, monkeypatch, capsys):
    (project / "mine.yaml").write_text(SCENARIO)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "../proj/mine.yaml", "--out", "run", "--quiet"]) == 0
    report = json.loads(Path("run/report.json").read_text())
    assert report["metric"] == "accuracy" and set(report["accuracy"]["final"]) == {"net"}
    resolved = Path("run/scenario.yaml").read_text()
    assert f"{project.resolve()}/model.py:build" in resolved and f"{project.resolve()}/data.npz" in resolved
    assert multinet.load("run/net.mnet")(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    capsys.readouterr()
    assert main(["run", "../proj/mine.yaml", "--out", "run2", "--quiet", "--set", "data.source=flat"]) == 0
    report = json.loads(Path("run2/report.json").read_text())
    assert report["metric"] == "agreement" and report["accuracy"]["original"] == {"net": 1.0}
    assert "top-1 agreement with the original" in capsys.readouterr().out


def _cli_bad(project: Path):
    """(argv after `compress`, message) pairs; paths are relative to the project folder."""
    np.savez(project / "odd.npz", a=np.zeros((4, 3, 8, 8)), b=np.zeros(4))
    np.savez(project / "short.npz", x=np.zeros((10, 3, 8, 8), np.float32), y=np.zeros(7, np.int64))
    np.savez(project / "grey.npz", x=np.zeros((10, 1, 8, 8), np.float32))
    (project / "data.csv").write_text("1,2\n")
    (project / "syntax.py").write_text("def build(:\n")
    _images(project / "mixed", sizes=[(8, 8), (10, 12)])
    torch.save(torch.nn.Linear(2, 2), project / "whole.pt")
    torch.save(object(), project / "pickled_data.pt")
    torch.save(torch.zeros(1, 3, 8, 8), project / "one.pt")
    (project / "prog.pt2").write_bytes(b"PK")
    ok = ["model.py:build", "--checkpoint", "sd.pt"]
    return [
        (ok + ["--data", "missing.npz"], "data file 'missing.npz' does not exist"),
        (ok + ["--data", "data.csv"], "cannot read data from 'data.csv'"),
        (ok + ["--data", "cifar"], "neither a built-in dataset"),
        (ok + ["--data", "odd.npz"], "odd.npz has a, b; multinet reads inputs from x, inputs, images"),
        (ok + ["--data", "short.npz"], "labels in short.npz have shape (7,) for 10 inputs"),
        (ok + ["--data", "mixed"], "differ in size (8x8 in 00.png, 10x12 in 01.png); give an image size"),
        (ok + ["--data", "pickled_data.pt"], "cannot read pickled_data.pt as tensors"),
        (ok + ["--data", "one.pt"], "needs at least 2"),
        (ok + ["--data", "model.py:nothing_useful"], "returned int"),
        (ok + ["--data", "data.npz", "--image-size", "8"], "apply to a folder of images"),
        (ok + ["--data", "photos", "--mean", "0.5,0.5"], "mean has 2 values for 3-channel images"),
        (ok + ["--eval-data", "data.npz"], "--eval-data needs --data"),
        (ok + ["--data", "grey.npz"], "do not fit the model"),
        (["model.py:build", "--model-arg", "classes=3", "--data", "data.npz"], "does not fit the labels of the data.npz inputs"),
        (["model.py:broken", "--data", "data.npz"], "model.py:broken() raised ValueError: no weights for width 8"),
        (["model.py:build", "--model-arg", "width", "--data", "data.npz"], "must look like key=value"),
        (["model.py:build", "--model-arg", "depth=3", "--data", "data.npz"], "unexpected keyword argument 'depth'"),
        (["nope.py:build", "--data", "data.npz"], "nope.py' does not exist"),
        (["syntax.py:build", "--data", "data.npz"], "cannot import"),
        (["whole.pt", "--data", "data.npz"], "does not unpickle whole models"),
        (["sd.pt", "--data", "data.npz"], "holds a state dict, not a model"),
        (["prog.pt2", "--data", "data.npz"], "torch.export archives are not read"),
        (["zoo:mlp", "--model-arg", "width=3"], "apply to a factory, not to zoo:mlp"),
    ]


def test_bad_user_input_exits_2_with_one_line_and_writes_nothing(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    for argv, message in _cli_bad(project):
        before = sorted(p.name for p in project.rglob("*"))
        code = main(["compress", *argv, "--ratio", "0.5", "--save", "out.mnet", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("multinet: error: "), \
            (argv, err)
        assert sorted(p.name for p in project.rglob("*")) == before, argv


def test_bad_scenario_data_fails_before_writing_and_keys_keep_their_line(project, tmp_path, capsys):
    cases = [
        (SCENARIO.replace("source: data.npz", "source: missing.npz"), "data file"),
        (SCENARIO.replace("model.py:build", "nope.py:build"), "does not exist"),
        (SCENARIO.replace("args: {width: 8}", "args: {width: 8, classes: 3}").replace("    checkpoint: sd.pt\n", ""),
         "does not fit the labels"),
        (SCENARIO.replace("  source: data.npz", "  sourc: data.npz"),
         "mine.yaml:8: unknown key `data.sourc`; did you mean 'source'?"),
        (SCENARIO.replace("  calibration: 32", "  calibration: 32\n  image_size: 0"), "mine.yaml:10: `data.image_size"),
    ]
    for text, message in cases:
        (project / "mine.yaml").write_text(text)
        out = tmp_path / "run"
        assert main(["run", str(project / "mine.yaml"), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def _readme_section() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return text.split("## Your own model and data")[1].split("\n## ")[0]


def test_readme_commands_for_your_own_model_and_data_work(tmp_path, monkeypatch, capsys):
    """The README's model.py, commands and scenario, run as written (weights and data made here)."""
    section = _readme_section()
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    model_py = next(code for lang, code in blocks if lang == "python")
    scenario = next(code for lang, code in blocks if lang == "yaml")
    commands = [line for lang, code in blocks if lang == "bash" for line in code.splitlines()
                if line.startswith("multinet ")]
    (tmp_path / "model.py").write_text(model_py)
    (tmp_path / "mine.yaml").write_text(scenario)
    ns = {}
    exec(model_py, ns)
    torch.save(ns["build"](width=32).state_dict(), tmp_path / "weights.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(24, 3, 12, 12)).astype(np.float32), y=rng.integers(0, 10, 24))
    _images(tmp_path / "photos", [(20, 24), (16, 16), (24, 20), (16, 18)], classes=["a", "b"])
    monkeypatch.chdir(tmp_path)
    assert len(commands) == 4
    for command in commands:
        assert main(shlex.split(command)[1:] + ["--quiet"]) == 0, command
    assert (tmp_path / "small.mnet").exists() and (tmp_path / "runs/mine/net.mnet").exists()
    assert "test accuracy on photos/" in capsys.readouterr().out


def test_image_folders_that_cannot_be_read(project):
    (project / "empty").mkdir()
    with pytest.raises(MultinetError, match="holds no images"):
        read("empty", base_dir=project)
    (project / "flat" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(MultinetError, match="cannot decode image .*zz.png"):
        read("flat", base_dir=project)
    _images(project / "photos", [(8, 8)])  # an image beside the class folders
    with pytest.raises(MultinetError, match="both at its top and in subfolders"):
        read("photos", base_dir=project)


def test_a_module_that_fails_at_import_is_one_line(tmp_path, monkeypatch, capsys):
    from multinet.cli import main

    (tmp_path / "broken_models.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "broken_models:build", "--input-shape", "1,4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot import 'broken_models': SyntaxError" in err[0]
