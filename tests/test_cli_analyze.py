"""A user's own CNN (their file, a state_dict) and their own .pt data set through
``hbk analyze --arch mymodule:make_model --model sd.pt --data data.pt`` and through the Python
API to a report with figures (issue 10's done-when); the other model/data formats, the memory
budget's labels, and torchrun with two ranks against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hbkernels.boundary as B
from hbkernels import cli

pytestmark = pytest.mark.usefixtures("one_thread")

MYMODULE = '''
import torch
from torch import nn


class MyCNN(nn.Module):
    def __init__(self, channels=2, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.fc = nn.Linear(channels * 3 * 3, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_model(channels=2):
    return MyCNN(channels)
'''

FAST = ["--resolution", "6", "--k", "2"]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """mymodule.py, sd.pt (state_dict of a briefly trained CNN) and data.pt in one directory."""
    d = tmp_path_factory.mktemp("user")
    (d / "mymodule.py").write_text(MYMODULE)
    sys.path.insert(0, str(d))
    try:
        import importlib

        mymodule = importlib.import_module("mymodule")
        torch.manual_seed(0)
        model = mymodule.make_model()
        X, y = torch.randn(18, 1, 5, 5), torch.arange(18) % 3
        opt = torch.optim.Adam(model.parameters(), 0.05)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        torch.save(model.state_dict(), d / "sd.pt")
        torch.save({"X": X, "y": y, "X_test": torch.randn(6, 1, 5, 5),
                    "y_test": torch.arange(6) % 3}, d / "data.pt")
        torch.save({"model": model.state_dict(), "epoch": 30}, d / "ckpt.pt")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("mymodule", None)
    return d


def _run_hbk(args, cwd, module="hbkernels.cli", launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *launcher, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_users_cnn_and_data_through_cli_and_api(user_dir, tmp_path):
    """The done-when: their file, their state_dict, their .pt data -> report with figures."""
    out = tmp_path / "cli"
    r = _run_hbk(["analyze", "--arch", "mymodule:make_model", "--model", "sd.pt", "--data",
                  "data.pt", "--out", str(out), *FAST], cwd=user_dir)
    assert r.returncode == 0, r.stderr
    assert "G_max = " in r.stdout and "(exact)" in r.stdout
    d = json.loads((out / "analysis.json").read_text())
    assert d["format"] == "state_dict" and d["exact"] and d["G_label"] == "exact"
    assert d["num_params"] == 2 * 9 + 2 + 18 * 3 + 3 and d["test_acc"] is not None
    assert d["spectral_type"]["type"] in ("MP", "MN", "QS", "mixed")
    report = (out / "report.md").read_text()
    assert "Analysis of sd on data" in report and "spectral type" in report
    from PIL import Image

    for png in d["figures"]:
        assert png in report and (out / png).stat().st_size > 2000
        assert (out / png).with_suffix(".pdf").stat().st_size > 1000
        assert Image.open(out / png).info["dpi"][0] == pytest.approx(300, abs=1)
    assert {"spectrum.png", "sample_alignment.png", "plane_alignment.png"} <= set(d["figures"])
    full = B.Analysis.load(out / "analysis_full.json")
    assert full.G == d["G"] and full.names == {"model": "sd", "data": "data"}

    # the same through the Python API
    sys.path.insert(0, str(user_dir))
    try:
        model = B.build_architecture("mymodule:make_model")
    finally:
        sys.path.remove(str(user_dir))
        sys.modules.pop("mymodule", None)
    model.load_state_dict(torch.load(user_dir / "sd.pt"))
    data = B.load_data_file(user_dir / "data.pt")
    an = B.analyze(model, "ce", (data.X, data.y), names={"model": "MyCNN", "data": "mydata"})
    assert an.G == pytest.approx(d["G"], abs=1e-12) and an.eps.eps == pytest.approx(d["eps"])
    api = tmp_path / "api"
    top = an.spectrum.top(2)
    g = B.alignment_map(model, [data.X[0], data.X[1], data.X[2]], top, resolution=6)
    note = B.g_note(an.G, lower_bound=an.G_lower_bound, rule=an.G_rule)
    assert note.endswith("(exact)")
    figs = [B.plot_alignment_maps([B.MapRow("MyCNN", g, an.spectrum.eigenvalues[:2], note=note)],
                                  api / "plane.png"),
            B.plot_spectra({"MyCNN": an.spectrum.eigenvalues}, api / "spectrum.png"),
            B.plot_sample_alignment({"MyCNN": (an.alignments, data.y, note)},
                                    api / "sample_alignment.png")]
    for f in figs:
        assert f.stat().st_size > 2000 and f.with_suffix(".pdf").exists()
    an.save(api / "analysis.json")
    (api / "report.md").write_text(an.report())
    assert "Analysis of MyCNN on mydata" in (api / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit
def test_checkpoint_torchscript_npz_and_errors(user_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(sys, "path", [str(user_dir), *sys.path])
    sys.modules.pop("mymodule", None)
    data = torch.load(user_dir / "data.pt")
    np.savez(tmp_path / "data.npz", x=data["X"].numpy(), y=data["y"].numpy())
    model = B.build_architecture("mymodule:make_model")
    model.load_state_dict(torch.load(user_dir / "sd.pt"))
    torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    base = ["--arch", "mymodule:make_model", "--no-figures", "--quiet"]
    res = {}
    for name, mfile, dfile in (("ckpt", "ckpt.pt", "data.pt"), ("ts", str(tmp_path / "ts.pt"),
                                                                 "data.pt"),
                               ("npz", "sd.pt", str(tmp_path / "data.npz"))):
        out = tmp_path / name
        assert cli.main(["analyze", "--model", mfile, "--data", dfile, "--out", str(out),
                         *base]) == 0, capsys.readouterr().err
        res[name] = json.loads((out / "analysis.json").read_text())
    assert res["ckpt"]["format"] == "checkpoint" and res["ckpt"]["checkpoint"] == 30
    assert res["ts"]["format"] == "torchscript"
    assert res["ckpt"]["G"] == res["ts"]["G"] == res["npz"]["G"]
    assert res["npz"]["test_acc"] is None
    # a state_dict without its architecture, a wrong factory, both data options
    for argv, msg in (
            (["--model", "sd.pt", "--data", "data.pt"], "expected --arch module:factory"),
            (["--model", "sd.pt", "--data", "data.pt", "--arch", "mymodule:nope"],
             "expected a callable 'nope'"),
            (["--model", "sd.pt", "--data", "data.pt", "--dataset", "gauss", "--arch",
              "mymodule:make_model"], "expected --data or --dataset, got both")):
        assert cli.main(["analyze", *argv, "--out", str(tmp_path / "x"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--arch", "nocolon", "--model", "sd.pt"])


def test_memory_budget_labels_lower_bound(user_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(sys, "path", [str(user_dir), *sys.path])
    sys.modules.pop("mymodule", None)
    out = tmp_path / "lb"
    assert cli.main(["analyze", "--arch", "mymodule:make_model", "--model", "sd.pt", "--data",
                     "data.pt", "--out", str(out), "--memory-budget", "1K", "--lanczos-k", "4",
                     *FAST]) == 0
    stdout = capsys.readouterr().out
    d = json.loads((out / "analysis.json").read_text())
    assert not d["exact"] and d["G_lower_bound"] and d["G_label"] == "lower bound (top-4)"
    assert "lower bound (top-4)" in stdout
    assert "lower bound (top-4)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(user_dir, tmp_path):
    args = ["analyze", "--arch", "mymodule:make_model", "--model", "sd.pt", "--data", "data.pt",
            "--no-figures", "--quiet"]
    one = _run_hbk([*args, "--out", str(tmp_path / "one")], cwd=user_dir)
    assert one.returncode == 0, one.stderr
    two = _run_hbk([*args, "--out", str(tmp_path / "two")], cwd=user_dir,
                   launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29533"))
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "analysis.json").read_text())
    b = json.loads((tmp_path / "two" / "analysis.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["G"] == a["G"] and b["eps"] == pytest.approx(a["eps"], rel=1e-8)
    assert b["trace"] == pytest.approx(a["trace"], rel=1e-8)
    assert sorted(Path(tmp_path / "two").iterdir()) == [
        tmp_path / "two" / f for f in ("analysis.json", "analysis_full.json", "analysis_full.pt",
                                       "report.md")]


def test_analyze_defaults_use_the_memory_rule_not_a_parameter_count():
    """The issue: train then analyze with defaults gave a lower bound for p = 10,602."""
    args = cli.build_parser().parse_args(["analyze", "--model", "m.pt"])
    assert args.max_exact_params is None and args.memory_budget is None
    from hbkernels.boundary import measures as M

    assert M.exact_spectrum_bytes(10_602) < 4 * 2**30  # the paper's nets: ~3.6 GB in float64
    assert M.exact_spectrum_fits(10_602, memory_budget=4 * 2**30)
    assert cli.build_parser().parse_args(
        ["analyze", "m", "--memory-budget", "1.5G"]).memory_budget == int(1.5 * 2**30)
