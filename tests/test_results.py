"""hbkernels.results: one JSON convention, save/load round trips, damaged files named."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

import hbkernels as hbk
from hbkernels.results import Result, load_result, save_json, to_jsonable


@dataclass
class _Inner(Result):
    value: float
    vec: torch.Tensor


@dataclass
class _Outer(Result):
    name: str
    inner: _Inner
    items: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


def test_to_jsonable_non_finite_is_null():
    d = to_jsonable({"a": float("nan"), "b": float("inf"), "c": torch.tensor([1.0, float("nan")]),
                     "d": torch.float64, "e": (1, 2)})
    assert d == {"a": None, "b": None, "c": [1.0, None], "d": "float64", "e": [1, 2]}
    json.dumps(d, allow_nan=False)  # strict JSON


def test_round_trip_nested(tmp_path):
    r = _Outer("x", _Inner(float("nan"), torch.arange(5.0)), [torch.ones(2, 3), 4, (1, 2)],
               {"k": torch.zeros(1)}, torch.float64)
    path = r.save(tmp_path / "r.json")
    assert (tmp_path / "r.pt").exists()
    back = _Outer.load(path)
    assert back.name == "x" and math.isnan(back.inner.value)
    torch.testing.assert_close(back.inner.vec, r.inner.vec)
    torch.testing.assert_close(back.items[0], torch.ones(2, 3))
    assert back.items[2] == (1, 2) and back.dtype is torch.float64
    assert isinstance(load_result(path), _Outer)
    with pytest.raises(ValueError, match="expected a saved _Inner"):
        _Inner.load(path)


def test_lanczos_result_round_trip(tmp_path):
    A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
    res = hbk.lanczos(lambda v: A @ v, 30, 3, seed=0, quiet=True)
    path = res.save(tmp_path / "eigs.json")
    back = hbk.LanczosResult.load(path)
    torch.testing.assert_close(back.eigenvalues, res.eigenvalues)
    torch.testing.assert_close(back.eigenvectors, res.eigenvectors)
    assert back.num_matvecs == res.num_matvecs
    assert "eigenvectors" not in res.to_dict(include_vectors=False)
    small = hbk.LanczosResult.load(res.save(tmp_path / "novec.json", include_vectors=False))
    assert small.eigenvectors.shape == (30, 0)


def test_damaged_files_are_named(tmp_path):
    r = _Inner(1.0, torch.ones(3))
    path = r.save(tmp_path / "r.json")
    (tmp_path / "r.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged file"):
        _Inner.load(path)
    (tmp_path / "r.pt").unlink()
    with pytest.raises(FileNotFoundError, match="r.pt"):
        _Inner.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="damaged file"):
        load_result(path)
    save_json({"a": 1}, path)
    with pytest.raises(ValueError, match="written by Result.save"):
        load_result(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_result(tmp_path / "missing.json")
