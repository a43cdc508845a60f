"""Objective: the total loss over all samples for any batching, parameter selection,
functional evaluation (the model untouched) and the determinism refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbkernels.objective import Objective, select_params

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_data(n=11):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradient_of_the_total_loss(reduction) -> None:
    model, X, y = model_and_data()
    batches = [(X[:2], y[:2]), (X[2:9], y[2:9]), (X[9:], y[9:])]
    obj = Objective("f", model, nn.CrossEntropyLoss(reduction=reduction), batches)
    want = F.cross_entropy(model(X), y, reduction=reduction)
    grads = torch.autograd.grad(want, list(model.parameters()))
    assert obj.num_samples == 11 and obj.dim == sum(p.numel() for p in model.parameters())
    assert obj.value() == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(obj.gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-10, atol=1e-13)
    assert [obj.weight(t) for _, t in batches] == ([2 / 11, 7 / 11, 2 / 11] if reduction == "mean" else [1.0] * 3)


def test_params_split_join_and_dtype_copy() -> None:
    model, X, y = model_and_data()
    model = model.float()
    names = select_params("f", model, lambda n: n.startswith("2."))
    assert names == ["2.weight", "2.bias"]
    obj = Objective("f", model, "ce", (X.float(), y), params=[model[2].weight], dtype=torch.float64)
    assert obj.names == ["2.weight"] and obj.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched
    rows = torch.arange(2 * obj.dim, dtype=torch.float64).view(2, obj.dim)
    parts = obj.split(rows)
    assert parts["2.weight"].shape == (2, 4, 5)
    assert torch.equal(obj.join(list(parts.values()), 2), rows)
    with pytest.raises(ValueError, match="f: expected params to select at least one"):
        select_params("f", model, lambda n: False)
    with pytest.raises(TypeError, match="f: expected dtype float32 or float64"):
        Objective("f", model, "ce", (X, y), dtype=torch.int32)


def test_determinism_refusals_and_opt_out() -> None:
    _, X, y = model_and_data()
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.3), nn.Linear(5, 4)).double()
    with pytest.raises(ValueError, match="f: expected a deterministic model .*active Dropout '1'"):
        Objective("f", drop, "ce", (X, y))
    Objective("f", drop, "ce", (X, y), check_deterministic=False)
    bn = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 4)).double()
    before = bn[1].running_mean.clone()
    with pytest.raises(ValueError, match="train-mode BatchNorm1d '1'"):
        Objective("f", bn, "ce", (X, y))
    obj = Objective("f", bn, "ce", (X, y), check_deterministic=False)
    obj.gradient()
    assert torch.equal(bn[1].running_mean, before)  # buffers are copies


def test_target_checks() -> None:
    model, X, y = model_and_data()
    bad = y.clone()
    bad[0] = -100
    with pytest.raises(ValueError, match="expected class targets >= 0"):
        Objective("f", model, "ce", (X, bad))
    Objective("f", model, nn.CrossEntropyLoss(reduction="sum"), (X, bad))  # sum: ignore_index is fine
    with pytest.raises(ValueError, match="outputs and targets of batch 1 with the same number of rows"):
        Objective("f", model, "ce", [(X, y), (X[:3], y[:2])])
