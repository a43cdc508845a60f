"""The run store and the model cache: manifests, damaged and foreign files, disk full,
concurrent writers, and kill -9 of the run loop followed by a resume."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from hbkernels import fileio
from hbkernels.boundary import experiments as E
from hbkernels.boundary import training as T
from hbkernels.fileio import CorruptFileError, DamagedFileWarning

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 6, "epochs_scale": 0.002, "resolution": 12, "k_maps": 2, "margin_steps": 20,
        "margin_restarts": 2}
KEY = {"version": 1, "dataset": "gauss", "setup": "normal", "seed": 0, "analysis": {"r": 1}}
TIMING = ("train_seconds", "analysis_seconds")


def _row(i: float = 1.0) -> dict:
    return {"dataset": "gauss", "setup": "normal", "seed": 0, "G": 0.1 * i, "key": KEY}


def _arrays(i: float = 1.0) -> dict:
    return {"eigenvalues": torch.linspace(0, i, 50), "top_vectors": torch.ones(50, 3) * i}


def _no_temporaries(d: Path) -> bool:
    return not [p for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ----------------------------------------------------------------------------- run store
def test_save_load_round_trip_with_manifest(tmp_path):
    st = E.RunStore(tmp_path)
    assert st.load("r", KEY) is None
    st.save("r", _row(), _arrays())
    row_p, arr_p, man_p = st.paths("r")
    man = json.loads(man_p.read_text())
    assert man["key"] == KEY and set(man["files"]) == {row_p.name, arr_p.name}
    assert man["files"][arr_p.name] == fileio.sha256_file(arr_p)
    assert st.load("r", KEY)["G"] == pytest.approx(0.1)
    assert torch.equal(st.arrays("r")["top_vectors"], torch.ones(50, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other settings: absent, silently
        assert st.load("r", {**KEY, "seed": 1}) is None


@pytest.mark.parametrize("damage", ["edit_json", "truncate_pt", "foreign_pt", "manifest",
                                    "missing_pt", "row_key"])
def test_damaged_runs_are_named_and_recomputed(tmp_path, damage):
    st = E.RunStore(tmp_path)
    st.save("r", _row(), _arrays())
    st.save("other", {**_row(2.0), "key": {**KEY, "seed": 7}}, _arrays(2.0))
    row_p, arr_p, man_p = st.paths("r")
    named = {"edit_json": row_p, "truncate_pt": arr_p, "foreign_pt": arr_p, "manifest": man_p,
             "missing_pt": arr_p, "row_key": row_p}[damage]
    if damage == "edit_json":
        row_p.write_text(row_p.read_text().replace('"G": 0.1', '"G": 0.9'))
    elif damage == "truncate_pt":
        arr_p.write_bytes(arr_p.read_bytes()[:100])
    elif damage == "foreign_pt":
        shutil.copy(st.paths("other")[1], arr_p)
    elif damage == "manifest":
        man_p.write_text('{"format": "hbk-run-2", "files": ')
    elif damage == "missing_pt":
        arr_p.unlink()
    else:  # a consistent-looking row of other settings, with a matching hash
        other = json.loads(row_p.read_text())
        other["key"] = {**KEY, "seed": 9}
        row_p.write_text(json.dumps(other))
        man = json.loads(man_p.read_text())
        man["files"][row_p.name] = fileio.sha256_file(row_p)
        man_p.write_text(json.dumps(man))
    with pytest.warns(DamagedFileWarning, match=str(named).replace(".", r"\.")):
        assert st.load("r", KEY) is None
    with pytest.raises(CorruptFileError) if damage != "row_key" else _nothing():
        st.arrays("r")
    st.save("r", _row(3.0), _arrays(3.0))  # recomputed: replaces the damaged files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert st.load("r", KEY)["G"] == pytest.approx(0.3)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_run_without_manifest_is_absent(tmp_path):
    st = E.RunStore(tmp_path)
    st.save("r", _row(), _arrays())
    st.paths("r")[2].unlink()  # an interrupted save: row and arrays but no manifest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert st.load("r", KEY) is None
    with pytest.raises(CorruptFileError, match="expected a complete run r"):
        st.arrays("r")


def test_disk_full_during_save_is_named_and_leaves_the_run_absent(tmp_path, monkeypatch):
    st = E.RunStore(tmp_path)
    st.save("r", _row(), _arrays())
    calls = {"n": 0}
    real = os.fsync

    def full(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # directory syncs
            return real(fd)
        calls["n"] += 1
        if calls["n"] == 2:  # the arrays land, the row does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match=r"could not write .*r\.json: the disk is full") as e:
        st.save("r", _row(5.0), _arrays(5.0))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _no_temporaries(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert st.load("r", KEY) is None  # absent (no manifest), never half-new half-old


def _mount_tmpfs(path: Path, size: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, check=False)
    return r.returncode == 0


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        st = E.RunStore(mnt)
        st.save("small", _row(), _arrays())
        with pytest.raises(OSError, match="the disk is full") as e:
            st.save("big", {**_row(), "key": {**KEY, "seed": 1}},
                    {"eigenvalues": torch.randn(200_000)})
        assert e.value.errno == errno.ENOSPC and "big.pt" in str(e.value)
        assert _no_temporaries(mnt) and not st.paths("big")[2].exists()
        assert st.load("small", KEY)["G"] == pytest.approx(0.1)  # untouched
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def _writer(out: str, worker: int, rounds: int) -> None:
    st = E.RunStore(out)
    for j in range(rounds):
        name = f"run{j % 3}"
        key = {**KEY, "seed": j % 3}
        st.save(name, {**_row(worker + j), "key": key}, _arrays(worker + j))
        got = st.load(name, key)
        assert got is not None and got["key"] == key


def test_concurrent_writers_into_one_store(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 12)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    st = E.RunStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for j in range(3):
            row = st.load(f"run{j}", {**KEY, "seed": j})
            arr = st.arrays(f"run{j}")
            assert row is not None and arr["eigenvalues"][-1] == pytest.approx(row["G"] * 10)
    assert _no_temporaries(tmp_path)


# ----------------------------------------------------------------------------- model cache
def test_model_cache_rejects_foreign_and_damaged_entries(tmp_path):
    kw = {"width": 4, "epochs": {"normal": 3}, "cache_dir": tmp_path}
    a = T.train_setup("normal", "gauss", seed=0, **kw)
    b = T.train_setup("normal", "gauss", seed=1, **kw)
    assert T.train_setup("normal", "gauss", seed=0, **kw).cached
    d0 = next(p for p in tmp_path.iterdir() if "seed0" in p.name)
    d1 = next(p for p in tmp_path.iterdir() if "seed1" in p.name)
    shutil.copy(d1 / "model.pt", d0 / "model.pt")  # another model's weights in the cache
    with pytest.warns(DamagedFileWarning, match=str(d0 / "model.pt")):
        again = T.train_setup("normal", "gauss", seed=0, **kw)
    assert not again.cached
    assert torch.equal(again.model.fc1.weight, a.model.fc1.weight)
    assert not torch.equal(again.model.fc1.weight, b.model.fc1.weight)
    assert T.train_setup("normal", "gauss", seed=0, **kw).cached  # the entry was rewritten
    (d0 / "result.json").write_text("{")
    with pytest.warns(DamagedFileWarning, match="result.json"):
        assert not T.train_setup("normal", "gauss", seed=0, **kw).cached
    (d0 / "manifest.json").unlink()
    with pytest.warns(DamagedFileWarning, match="incomplete"):
        assert not T.train_setup("normal", "gauss", seed=0, **kw).cached
    assert _no_temporaries(tmp_path)


def test_disk_full_while_caching_a_model_is_named_and_leaves_no_entry(tmp_path, monkeypatch):
    def full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match=r"could not write .*model\.pt: the disk is full"):
        T.train_setup("normal", "gauss", seed=0, width=4, epochs={"normal": 2},
                      cache_dir=tmp_path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] in ([], [".lock"])
    assert not T.train_setup("normal", "gauss", seed=0, width=4, epochs={"normal": 2},
                             cache_dir=tmp_path).cached


def _cache_writer(cache: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", DamagedFileWarning)
    for seed in (0, 1, 0, 1):
        T.train_setup("adversarial", "gauss", seed=seed, width=4, cache_dir=cache,
                      epochs={"random-label": 3, "adversarial": 2})


def test_concurrent_writers_into_one_model_cache(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_cache_writer, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 4 and _no_temporaries(tmp_path)  # 2 seeds x (random-label, adv.)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(T.train_setup("adversarial", "gauss", seed=s, width=4, cache_dir=tmp_path,
                                 epochs={"random-label": 3, "adversarial": 2}).cached
                   for s in (0, 1))


def test_diverging_phase_is_not_cached(tmp_path, monkeypatch):
    real = T.reference_config
    monkeypatch.setattr(T, "reference_config",
                        lambda *a, **k: T.replace(real(*a, **k), lr=1e7))
    with pytest.raises(T.TrainingDivergedError, match="training diverged and nothing was saved"):
        T.train_setup("normal", "gauss", seed=0, width=4, epochs={"normal": 20},
                      cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- kill -9
GRID = (["gauss"], ["normal", "adversarial"], [0, 1])


def _grid_child(out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", DamagedFileWarning)
    E.run_grid(*GRID, E.Settings(**TINY), out, quiet=True)


def test_kill_9_at_random_points_then_resume_matches(tmp_path):
    """SIGKILL a process running the run loop at random times (training, analysis, cache and
    store writes), three times, then resume: the result equals an uninterrupted run's and no
    stored file is ever reported damaged."""
    settings = E.Settings(**TINY)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    t0 = time.perf_counter()
    ref, _ = E.run_grid(*GRID, settings, ref_dir, quiet=True)
    work = time.perf_counter() - t0
    ctx = mp.get_context("fork")  # starts at once (no interpreter start-up): kills land in work
    rng = random.Random(1234)
    codes = []
    for _ in range(3):
        p = ctx.Process(target=_grid_child, args=(str(run_dir),))
        p.start()
        time.sleep(rng.uniform(0.05, 0.8) * work)
        p.kill()  # SIGKILL: no cleanup, no atexit
        p.join(60)
        codes.append(p.exitcode)
    assert set(codes) <= {-9, 0} and codes[0] == -9  # the first one died mid-work
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file would raise DamagedFileWarning
        got, _ = E.run_grid(*GRID, settings, run_dir, quiet=True)
        again, none = E.run_grid(*GRID, settings, run_dir, quiet=True)
    assert none == {} and _strip(again) == _strip(got)
    assert _strip(got) == _strip(ref)
    for r in got:
        name = E.run_name(r["dataset"], r["setup"], r["seed"])
        a, b = E.RunStore(run_dir).arrays(name), E.RunStore(ref_dir).arrays(name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_of_the_hbk_command_then_resume(tmp_path):
    """The command itself: SIGKILL ``hbk reproduce`` once the first run is stored (the next
    one is training or being analysed), rerun: the same table as an uninterrupted run."""
    out = tmp_path / "rep"
    argv = [sys.executable, "-m", "hbkernels.cli", "reproduce", "table1", "--datasets", "gauss",
            "--seeds", "1", "--epochs-scale", "0.002", "--width", "6", "--resolution", "12",
            "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "runs").glob("*.manifest.json")):
        time.sleep(0.05)  # kill after the first run is stored, while the next one runs
    p.kill()
    p.wait(60)
    from hbkernels import cli

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file would raise DamagedFileWarning
        assert cli.main(argv[3:]) == 0  # the resume, in-process (one interpreter start less)
    rows = json.loads((out / "table1" / "results.json").read_text())["runs"]
    settings = E.Settings(width=6, epochs_scale=0.002, resolution=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, _ = E.run_grid(["gauss"], ["normal", "adversarial", "large-norm"], [0], settings,
                            tmp_path / "ref", quiet=True)
    assert _strip(rows) == _strip(json.loads(json.dumps(ref)))
