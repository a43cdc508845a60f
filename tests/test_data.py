"""BatchSource: every data form, conversion, streaming, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hbkernels.data import BatchSource, ForwardCall


def xy(n=7):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_pair_list_and_conversion() -> None:
    X, y = xy()
    src = BatchSource("f", (X, y), dtype=torch.float64)
    (b,) = list(src)
    assert src.in_memory and b.inputs[0].dtype == torch.float64 and b.targets.dtype == torch.int64
    assert torch.equal(b.inputs[0], X.double())
    src = BatchSource("f", [(X[:3], y[:3]), (X[3:], y[3:])])
    assert [bb.targets.shape[0] for bb in src] == [3, 4] and src.in_memory
    assert src.first().targets.shape[0] == 3


def test_dataloader_streamed_every_pass() -> None:
    X, y = xy(10)
    passes = []

    class Counting(TensorDataset):
        def __getitem__(self, i):
            passes.append(i)
            return super().__getitem__(i)

    loader = DataLoader(Counting(X, y), batch_size=4, drop_last=True)
    src = BatchSource("f", loader)
    assert not src.in_memory
    n0 = len(passes)
    assert [b.targets.shape[0] for b in src] == [4, 4]
    assert [b.targets.shape[0] for b in src] == [4, 4]
    assert len(passes) - n0 == 16  # two full passes over the 8 yielded samples
    cached = BatchSource("f", loader, cache=True)
    before = len(passes)
    list(cached), list(cached)
    assert cached.in_memory and len(passes) == before


def test_tuple_and_dict_batches_and_forward() -> None:
    X, y = xy()
    b = next(iter(BatchSource("f", [(X, X, y)])))
    assert len(b.inputs) == 2 and torch.equal(b.targets, y)
    d = next(iter(BatchSource("f", [{"x": X, "mask": X > 0, "labels": y}])))
    assert set(d.inputs) == {"x", "mask"} and torch.equal(d.targets, y)
    with pytest.raises(ValueError, match="f: expected dict batches with exactly one target key"):
        list(BatchSource("f", [{"x": X, "y": y, "labels": y}]))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, mask):
            return self.lin(x * mask)

    call = ForwardCall(Two())
    out, t = call(d)
    assert out.shape == (7, 2) and torch.equal(t, y)
    custom = ForwardCall(Two(), lambda m, batch: (m(batch["x"], batch["mask"]), batch["labels"]))
    raw = next(iter(BatchSource("f", [{"x": X, "mask": X > 0, "labels": y}], forward=lambda m, b: 0)))
    assert raw.inputs is None and custom(raw)[0].shape == (7, 2)
    bad = ForwardCall(Two(), lambda m, batch: m(batch["x"], batch["mask"]))
    with pytest.raises(TypeError, match="expected forward\\(model, batch\\) to return \\(outputs, targets\\)"):
        bad(raw)


def test_refusals() -> None:
    X, y = xy()
    ds = TensorDataset(X, y)
    with pytest.raises(ValueError, match="f: expected a DataLoader that yields the same batches"):
        BatchSource("f", DataLoader(ds, batch_size=2, shuffle=True))
    assert not BatchSource("f", DataLoader(ds, batch_size=2, shuffle=True), allow_shuffle=True).in_memory
    with pytest.raises(TypeError, match="f: expected re-iterable data"):
        BatchSource("f", ((X, y) for _ in range(2)))
    with pytest.raises(TypeError, match="f: expected data to be \\(X, y\\)"):
        BatchSource("f", 3)
    with pytest.raises(ValueError, match="f: expected at least one batch"):
        BatchSource("f", [])
    with pytest.raises(TypeError, match="f: expected each batch to be \\(inputs..., targets\\)"):
        list(BatchSource("f", [X]))
    with pytest.raises(TypeError, match="f: expected forward to be a callable"):
        BatchSource("f", (X, y), forward=3)
