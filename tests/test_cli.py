"""Smoke tests of every `hbk` subcommand (in-process via cli.main, and the console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hbkernels import cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--width", "6", "--resolution", "12", "--quiet"]


@pytest.mark.parametrize("sub", [[], ["demo"], ["train"], ["analyze"], ["reproduce"]])
def test_help_for_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(sub + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: hbk" in text and "--help" in text
    if sub:
        assert "--out" in text and "--seed" in text and "--quiet" in text
    else:
        assert all(c in text for c in ("demo", "train", "analyze", "reproduce"))


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--seeds", "0"])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_demo_fast_writes_report_results_and_figures(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--fast", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["setup"] for r in res["runs"]] == ["normal", "adversarial", "large-norm"]
    for r in res["runs"]:
        for key in ("setup", "dataset", "seed", "G", "G_rule", "eps", "trace", "lambda_max",
                    "param_norm", "train_acc", "test_acc"):
            assert key in r
        assert r["dataset"] == "gauss" and r["G_rule"] == "max"
    report = (out / "report.md").read_text()
    assert "| gauss | normal |" in report and "Wall time" in report
    for png in ("alignment_maps.png", "spectra.png", "sample_alignment.png"):
        assert (out / png).stat().st_size > 2000 and png in report
    stamp = (out / "runs" / "gauss--normal--seed0.json").stat().st_mtime_ns
    assert cli.main(["demo", "--fast", "--out", str(out), *TINY]) == 0  # resumed
    assert (out / "runs" / "gauss--normal--seed0.json").stat().st_mtime_ns == stamp


def test_train_then_analyze_model_checkpoint_and_state_dict(tmp_path):
    tr = tmp_path / "train"
    assert cli.main(["train", "--dataset", "gauss", "--epochs", "30", "--width", "6",
                     "--checkpoint-every", "10", "--out", str(tr), "--quiet"]) == 0
    meta = json.loads((tr / "result.json").read_text())
    assert meta["info"]["dataset"] == "gauss" and meta["checkpoint_epochs"] == [0, 10, 20, 30]
    an = tmp_path / "an"
    assert cli.main(["analyze", str(tr), "--out", str(an), "--k", "2", "--margin",
                     "--margin-steps", "5", *TINY[2:]]) == 0
    d = json.loads((an / "analysis.json").read_text())
    assert d["dataset"] == "gauss" and d["exact"] and d["num_params"] == 81
    assert d["G"] is None or 0 <= d["G"] <= 1
    assert d["margin"]["margin"] > 0 and "boundary_peaks" in d
    for png in d["figures"]:
        assert (an / png).stat().st_size > 2000
    # a checkpoint of the same run
    ck = tmp_path / "ck"
    assert cli.main(["analyze", str(tr / "checkpoints.pt"), "--checkpoint", "10", "--out", str(ck),
                     "--no-figures", "--quiet"]) == 0
    dc = json.loads((ck / "analysis.json").read_text())
    assert dc["checkpoint"] == 10 and dc["format"] == "checkpoints"
    # a bare state_dict needs the dataset; the width is inferred
    sd_path = tmp_path / "sd.pt"
    from hbkernels.boundary.models import load_model

    torch.save(load_model(tr / "model.pt").state_dict(), sd_path)
    sd = tmp_path / "sd"
    assert cli.main(["analyze", str(sd_path), "--dataset", "gauss", "--out", str(sd),
                     "--no-figures", "--quiet"]) == 0
    ds_ = json.loads((sd / "analysis.json").read_text())
    assert ds_["format"] == "state_dict" and ds_["trace"] == pytest.approx(d["trace"], rel=1e-9)
    with pytest.raises(SystemExit, match="--dataset"):
        cli.main(["analyze", str(sd_path), "--out", str(sd), "--quiet"])


def test_train_with_overrides(tmp_path):
    out = tmp_path / "adam"
    assert cli.main(["train", "--dataset", "circle", "--optimizer", "adam", "--lr", "0.01",
                     "--epochs", "5", "--width", "4", "--batch-size", "full", "--out", str(out),
                     "--quiet"]) == 0
    meta = json.loads((out / "result.json").read_text())
    assert meta["config"]["optimizer"] == "adam" and meta["config"]["batch_size"] == "full"


def test_reproduce_table1_gauss_one_seed(tmp_path):
    out = tmp_path / "rep"
    assert cli.main(["reproduce", "table1", "--datasets", "gauss", "--seeds", "1",
                     "--epochs-scale", "0.002", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "table1" / "results.json").read_text())
    assert {r["setup"] for r in res["runs"]} == {"normal", "adversarial", "large-norm"}
    assert "gauss" in res["checks"] and (out / "table1" / "report.md").exists()


def test_console_script_subprocess(tmp_path):
    exe = shutil.which("hbk", path=str(Path(sys.executable).parent)) or shutil.which("hbk")
    if exe is None:
        pytest.skip("the hbk console script is not installed in this environment")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "reproduce" in r.stdout
    r = subprocess.run([exe, "analyze", str(tmp_path / "missing")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode != 0 and "expected an existing model file" in r.stderr
