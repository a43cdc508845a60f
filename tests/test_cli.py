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


def test_train_then_analyze_model_checkpoint_and_state_dict(tmp_path, capsys):
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
    assert cli.main(["analyze", str(sd_path), "--out", str(sd), "--quiet"]) == 1
    assert "expected --dataset to rebuild a model" in capsys.readouterr().err


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
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 0 and "reproduce" in r.stdout
    r = subprocess.run([exe, "analyze", str(tmp_path / "missing")], capture_output=True,
                       text=True, env=env, timeout=120, check=False)
    assert r.returncode == 1 and "expected an existing model file" in r.stderr
    assert r.stderr.startswith("hbk: error: ") and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- bad input
def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    return err


def _one_error_line(capsys, *words: str) -> str:
    lines = [ln for ln in _err(capsys).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hbk: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["train", "--batch-size", "0"], "argument --batch-size: expected 'full' or an integer >= 1"),
    (["train", "--batch-size", "x"], "argument --batch-size"),
    (["train", "--checkpoint-every", "-5"],
     "argument --checkpoint-every: expected an integer >= 0"),
    (["train", "--lr", "inf"], "argument --lr: expected a finite positive number"),
    (["train", "--lr", "nan"], "argument --lr"),
    (["train", "--lr", "-1"], "argument --lr"),
    (["train", "--epochs", "abc"], "argument --epochs: expected an integer >= 1"),
    (["train", "--seed", "-3"], "argument --seed: expected an integer >= 0"),
    (["train", "--dataset", "nope"], "expected a dataset name, one of gauss"),
    (["train", "--dataset", "mnist-11"], "distinct class digits"),
    (["analyze", "m.pt", "--dataset", "nope"], "expected a dataset name"),
    (["demo", "--epochs-scale", "inf"], "argument --epochs-scale"),
    (["reproduce", "figures", "--datasets", "nope"], "expected figures datasets from gauss"),
    (["reproduce", "table1", "--datasets", "iris"], "expected table1 datasets from gauss"),
    (["reproduce", "table2", "--datasets", "nope"], "expected a dataset name"),
    (["reproduce", "table2", "--datasets", "gauss"], "expected table2 datasets"),
    (["reproduce", "table1", "--datasets", "gauss", "gauss"], "distinct names"),
])
def test_usage_errors_exit_2_with_the_choices(argv, words, capsys, monkeypatch, tmp_path):
    from hbkernels.boundary import experiments as E
    from hbkernels.boundary import training as T

    def no_work(*a, **k):
        raise AssertionError("work started")

    for mod, name in ((T, "train_setup"), (T, "train"), (E, "table1"), (E, "table2"),
                      (E, "figures"), (E, "demo")):
        monkeypatch.setattr(mod, name, no_work)
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = _err(capsys)
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("names, two_d, digits", [
    (["half-moon"], ["half-moon"], None),              # no digits CNN trained for a 2-D figure
    (["gauss", "digits-179"], ["gauss"], "digits-179"),
    (None, None, "digits-017"),                          # no --datasets: every figure
])
def test_reproduce_figures_trains_only_what_datasets_names(names, two_d, digits, monkeypatch, tmp_path):
    from hbkernels.boundary import experiments as E

    seen = {}

    def fake_figures(out, **kw):
        seen.update(kw)
        return {"figures": []}

    monkeypatch.setattr(E, "figures", fake_figures)
    argv = ["reproduce", "figures", "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv + (["--datasets", *names] if names else [])) == 0
    assert seen["digits"] == digits
    assert list(seen["datasets"]) == (two_d if two_d is not None else list(E.TABLE1_DATASETS))


def test_train_diverging_lr_fails_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "div"
    assert cli.main(["train", "--lr", "1e6", "--epochs", "50", "--width", "4", "--out", str(out),
                     "--quiet"]) == 1
    _one_error_line(capsys, "hbk.train: expected a finite training loss", "diverged")
    assert not (out / "model.pt").exists() and not (out / "result.json").exists()
    assert cli.main(["train", "--setup", "adversarial", "--lr", "0.1", "--epochs", "5",
                     "--out", str(out), "--quiet"]) == 1
    _one_error_line(capsys, "expected --setup normal or random-label with --lr")


def test_unwritable_out_or_cache_fails_before_training(tmp_path, capsys, monkeypatch):
    from hbkernels.boundary import training as T

    def no_work(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(T, "train_setup", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for argv, what in ((["--out", str(blocker / "sub")], "hbk train --out"),
                       (["--out", str(blocker)], "hbk train --out"),
                       (["--out", str(tmp_path / "ok"), "--cache", str(blocker / "c")],
                        "hbk train --cache")):
        assert cli.main(["train", "--quiet", *argv]) == 1
        _one_error_line(capsys, what, "expected a writable")
    for sub in (["demo"], ["reproduce", "table1"], ["analyze", str(tmp_path)]):
        assert cli.main([*sub, "--out", str(blocker / "x"), "--quiet"]) == 1
        _one_error_line(capsys, "expected a writable location")


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(200))
    assert cli.main(["analyze", str(bad), "--dataset", "gauss", "--out", str(tmp_path / "a"),
                     "--quiet"]) == 1
    _one_error_line(capsys, "damaged or foreign file", str(bad))
    assert cli.main(["--debug", "analyze", str(bad), "--dataset", "gauss", "--out",
                     str(tmp_path / "a"), "--quiet"]) == 1
    err = _err(capsys)
    assert "Traceback" in err and "CorruptFileError" in err
    assert cli.main(["analyze", str(bad), "--dataset", "gauss", "--out", str(tmp_path / "a"),
                     "--quiet", "--debug"]) == 1
    assert "Traceback" in _err(capsys)


def test_missing_mnist_files_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HBK_DATA", str(tmp_path / "nodata"))
    out = tmp_path / "r"
    assert cli.main(["reproduce", "table2", "--datasets", "iris", "mnist-017", "--out",
                     str(out), "--quiet"]) == 1
    _one_error_line(capsys, "t10k-images-idx3-ubyte", "nothing is downloaded")
    assert not (out / "runs").exists() or not any((out / "runs").glob("iris*"))  # before work
    assert cli.main(["train", "--dataset", "mnist-017", "--out", str(tmp_path / "t"),
                     "--quiet"]) == 1
    _one_error_line(capsys, "MNIST test files")


def test_analyze_reports_corrupt_and_foreign_files(tmp_path, capsys):
    tr = tmp_path / "tr"
    assert cli.main(["train", "--epochs", "3", "--width", "4", "--out", str(tr), "--quiet"]) == 0
    tr5 = tmp_path / "tr5"
    assert cli.main(["train", "--epochs", "3", "--width", "5", "--out", str(tr5), "--quiet"]) == 0
    an = ["--out", str(tmp_path / "an"), "--no-figures", "--quiet"]
    model = (tr / "model.pt").read_bytes()

    def case(name: str, data: bytes | None = None, obj=None) -> Path:
        p = tmp_path / name
        if obj is not None:
            torch.save(obj, p)
        else:
            p.write_bytes(data)
        return p

    files = {
        "truncated": case("trunc.pt", model[: len(model) // 2]),
        "empty": case("empty.pt", b""),
        "random": case("rand.pt", os.urandom(500)),
        "text": case("text.pt", b"hello, not a model\n"),
    }
    for what, p in files.items():
        assert cli.main(["analyze", str(p), "--dataset", "gauss", *an]) == 1, what
        line = _one_error_line(capsys, str(p))
        assert "damaged" in line or "empty file" in line, line
        assert "--allow-pickle" not in line
    # a valid torch file that is not a model
    p = case("tensor.pt", obj=torch.ones(3))
    assert cli.main(["analyze", str(p), "--dataset", "gauss", *an]) == 1
    _one_error_line(capsys, "not a model file", "a tensor of shape (3,)")
    # a pickled module: only then --allow-pickle is suggested
    p = case("module.pt", obj=torch.nn.Linear(2, 3))
    assert cli.main(["analyze", str(p), "--dataset", "gauss", *an]) == 1
    _one_error_line(capsys, "pickled object", "--allow-pickle")
    # another model's model.pt inside a train directory: named by its hash check
    shutil.copy(tr5 / "model.pt", tr / "model.pt")
    assert cli.main(["analyze", str(tr), *an]) == 1
    _one_error_line(capsys, str(tr / "model.pt"), "sha256")
    # a model for another dataset: the class count is named before any work
    assert cli.main(["analyze", str(tr5), "--dataset", "circle", *an]) == 1
    _one_error_line(capsys, "expected a model with 2 outputs for circle")
    assert cli.main(["analyze", str(tr5), "--dataset", "iris", *an]) == 1
    _one_error_line(capsys, "expected a model that takes iris inputs of shape (4,)")
    # a directory without its manifest (an interrupted save): analysed, with a warning line
    (tr5 / "manifest.json").unlink()
    assert cli.main(["analyze", str(tr5), *an]) == 0
    assert _err(capsys).startswith(f"hbk: warning: {tr5} has no manifest.json")


def test_disk_full_and_damaged_cache_are_reported(tmp_path, capsys, monkeypatch):
    import stat

    from hbkernels import fileio

    cache, out = tmp_path / "cache", tmp_path / "t"
    argv = ["train", "--epochs", "3", "--width", "4", "--cache", str(cache), "--out", str(out),
            "--quiet"]
    assert cli.main(argv) == 0
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    (entry / "model.pt").write_bytes(b"garbage")
    assert cli.main(argv) == 0  # retrained, with one warning line naming the file
    err = _err(capsys).splitlines()
    assert len(err) == 1 and err[0].startswith("hbk: warning: the cached model ")
    assert str(entry / "model.pt") in err[0]
    assert cli.main(argv) == 0 and _err(capsys) == ""  # the entry was rewritten

    real = os.fsync

    def full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", full)
    assert cli.main(["train", "--epochs", "3", "--width", "4", "--out", str(tmp_path / "full"),
                     "--quiet"]) == 1
    _one_error_line(capsys, "the disk is full", str(tmp_path / "full"))
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "full").iterdir() if not p.name.startswith(".hbk")]
