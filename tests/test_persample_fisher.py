"""The empirical Fisher operator (hbkernels/persample/fisher.py) against G^T G from vmap(grad)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from persample_refs import STRATEGIES, DictModel, Scale, mlp, ref_grads, small_cnn
from torch import nn

import hbkernels as hbk

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(48, 4), Scale(4), nn.Linear(4, 3)).to(dtype)
    X = torch.randn(7, 2, 4, 4, dtype=dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    return model, X, y


@pytest.mark.parametrize("budget", [None, 64], ids=["store", "recompute"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ef_matches_its_dense_definition(reduction, budget, dtype):
    model, X, y = _setup(dtype)
    G = ref_grads(model, X, y)
    ref = G.T @ G / (7 if reduction == "mean" else 1)
    for s in STRATEGIES:
        op = hbk.EmpiricalFisherOperator(model, nn.CrossEntropyLoss(reduction=reduction), (X, y),
                                         strategy=s, memory_budget=budget, block_size=3)
        assert op.reduction == reduction and op.dim == G.shape[1] and op.num_samples == 7
        assert_close_scaled(op.dense(block_size=64), ref)
        v = torch.randn(G.shape[1], dtype=dtype)
        assert_close_scaled(op @ v, ref @ v)


def test_ef_with_probed_callable_and_dict_inputs():
    torch.manual_seed(1)
    model = DictModel().double()
    batch = {"image": torch.randn(5, 1, 6, 6, dtype=torch.float64),
             "extra": torch.randn(5, 2, dtype=torch.float64)}
    y = torch.tensor([0, 2, 1, 1, 0])
    fwd = lambda m, b: m(**b).logits
    G = ref_grads(model, batch, y, forward=fwd)
    summed = lambda o, t: F.cross_entropy(o, t, reduction="sum")
    op = hbk.EmpiricalFisherOperator(model, summed, (batch, y), forward=fwd)
    assert op.reduction == "sum"
    assert_close_scaled(op.dense(), G.T @ G)
    op = hbk.EmpiricalFisherOperator(model, F.cross_entropy, (batch, y), forward=fwd)
    assert op.reduction == "mean"
    assert_close_scaled(op.dense(), G.T @ G / 5)


def test_fisher_eigs_match_eigh():
    torch.manual_seed(2)
    model = mlp(widths=(6,), act=nn.Tanh).double()
    X = torch.randn(20, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    G = ref_grads(model, X, y)
    evals = torch.linalg.eigvalsh(G.T @ G / 20).flip(0)
    res = hbk.fisher_eigs(model, "ce", (X, y), 3, tol=1e-10, seed=0)
    assert_close_scaled(res.eigenvalues.double(), evals[:3], rtol=1e-8)
    V = res.eigenvectors.double()
    assert_close_scaled((G.T @ G / 20) @ V, V * res.eigenvalues.double(), rtol=1e-6)
    assert res.extra["reduction"] == "mean" and res.extra["num_samples"] == 20


def test_ef_errors():
    model = small_cnn().double()
    X = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="hbk.EmpiricalFisherOperator: expected data to be"):
        hbk.EmpiricalFisherOperator(model, "ce", X)
    with pytest.raises(TypeError, match="targets inside data"):
        hbk.EmpiricalFisherOperator(model, "ce", (X, torch.zeros(3, dtype=torch.long)),
                                    labels="pred")
    with pytest.raises(ValueError, match=r"expected targets in \[0, 3\)"):
        hbk.EmpiricalFisherOperator(model, "ce", (X, torch.full((3,), 5)))
