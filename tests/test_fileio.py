"""Atomic writes, damage-aware loads and the store lock (hbkernels.fileio)."""

from __future__ import annotations

import errno
import os
import pickle
import threading

import pytest
import torch

from hbkernels import fileio
from hbkernels.fileio import (
    CorruptFileError,
    PickleNeededError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    load_torch,
    read_json,
    sha256_file,
    store_lock,
)


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and _leftovers(p.parent) == []
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(load_torch("t", tmp_path / "t.pt")["x"], torch.arange(3))
    assert sha256_file(p) == fileio.sha256_bytes(b"two")


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system")])
def test_write_errors_are_named_and_nothing_half_written(tmp_path, monkeypatch, code, words):
    p = tmp_path / "keep.txt"
    atomic_write_text(p, "old content")

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.os, "fsync", fail)
    with pytest.raises(OSError) as info:
        atomic_write_text(p, "new content that never lands")
    assert info.value.errno == code
    assert str(p) in str(info.value) and words in str(info.value)
    monkeypatch.undo()
    assert p.read_text() == "old content" and _leftovers(tmp_path) == []


def test_interrupted_write_removes_its_temporary(tmp_path, monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "x.bin", b"abc")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_of_one_file_never_fail(tmp_path):
    p = tmp_path / "shared.pt"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(25):
                atomic_torch_save({"i": torch.full((50,), float(i * 100 + j))}, p)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    v = load_torch("t", p)["i"]
    assert v.shape == (50,) and bool((v == v[0]).all())  # one writer's whole file
    assert _leftovers(tmp_path) == []


def test_check_writable(tmp_path, monkeypatch):
    assert check_writable("hbk x", tmp_path / "new" / "dir").is_dir()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(NotADirectoryError,
                       match=r"hbk x: expected a writable directory, got .*file"):
        check_writable("hbk x", f)
    with pytest.raises(OSError, match="hbk x: expected a writable location"):
        check_writable("hbk x", f / "below")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"hbk x: expected a writable location, got .*"
                                              r"\(permission denied\)"):
        check_writable("hbk x", tmp_path)


def test_read_json_names_damaged_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"a": 1')
    with pytest.raises(CorruptFileError,
                       match=r"hbk.f: expected a JSON file, got a damaged file .*r\.json") as e:
        read_json("hbk.f", p)
    assert e.value.path == str(p)
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorruptFileError, match="damaged file"):
        read_json("hbk.f", p)
    with pytest.raises(FileNotFoundError, match="hbk.f: expected an existing file"):
        read_json("hbk.f", tmp_path / "missing.json")


def test_load_torch_tells_damage_from_pickles(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4, 4)}, good)
    blob = good.read_bytes()
    cases = {"trunc.pt": blob[: len(blob) // 2], "empty.pt": b"", "rand.pt": os.urandom(300),
             "text.pt": b'{"not": "torch"}'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptFileError, match=f"hbk.l: expected a model, got an? .*{name}"):
            load_torch("hbk.l", tmp_path / name, what="a model")
        with pytest.raises(CorruptFileError):  # never an unpickling attempt on damage
            load_torch("hbk.l", tmp_path / name, allow_pickle=True)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(PickleNeededError, match=r"pickled object .*Linear.*--allow-pickle"):
        load_torch("hbk.l", tmp_path / "module.pt")
    assert isinstance(load_torch("hbk.l", tmp_path / "module.pt", allow_pickle=True),
                      torch.nn.Linear)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(PickleNeededError):
        load_torch("hbk.l", tmp_path / "plain.pkl")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch("hbk.l", tmp_path / "legacy.pt")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="hbk.l: expected an existing file"):
        load_torch("hbk.l", tmp_path / "none.pt")


def test_store_lock_excludes_other_holders(tmp_path):
    order: list[str] = []
    inside = threading.Event()

    def holder() -> None:
        with store_lock(tmp_path):
            inside.set()
            order.append("a-in")
            threading.Event().wait(0.2)
            order.append("a-out")

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    with store_lock(tmp_path, shared=True):
        order.append("b")
    t.join()
    assert order == ["a-in", "a-out", "b"]


def test_stale_temporaries_are_removed_young_ones_kept(tmp_path):
    old_f, young_f = tmp_path / ".a.json.x1.tmp", tmp_path / ".b.pt.x2.tmp"
    old_d = tmp_path / ".tmp-run-abc"
    keep = tmp_path / "a.json"
    for p in (old_f, young_f, keep):
        p.write_text("x")
    old_d.mkdir()
    (old_d / "model.pt").write_text("x")
    for p in (old_f, old_d):
        os.utime(p, (1, 1))
    os.utime(keep, (1, 1))
    assert fileio.remove_stale_temporaries(tmp_path, older_than=60) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.pt.x2.tmp", "a.json"]
