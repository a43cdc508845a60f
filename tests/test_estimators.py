"""Trace (Hutchinson, Hutch++) and SLQ density on known spectra and on Hessian operators."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbkernels as hbk

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def cls_data(n=23):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def known_matrix(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=torch.float64),
                       0.1 * torch.randn(n - 4, generator=g, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * evals) @ Q.T, evals


def test_trace_estimators() -> None:
    A, evals = known_matrix()
    tr = float(evals.sum())
    op = hbk.MatrixOperator(A)
    pp = hbk.hessian_trace(op, num_probes=30, seed=0)
    assert pp.num_matvecs == 30 and op.num_matvecs == 30
    # Hutch++ removes the 4 outliers exactly: its error is that of the small bulk
    assert abs(pp.estimate - tr) < 4 * pp.std_error + 1e-9 and abs(pp.estimate - tr) < 1.0
    hu = hbk.hessian_trace(A, num_probes=200, method="hutchinson", seed=0, block_size=64)
    assert abs(hu.estimate - tr) < 4 * hu.std_error
    # a sketch that spans everything makes Hutch++ exact
    exact = hbk.hessian_trace(op, num_probes=3 * 60, seed=1)
    assert exact.estimate == pytest.approx(tr, abs=1e-9)
    assert hbk.hessian_trace(op, num_probes=30, seed=0).estimate == pp.estimate  # seeded
    assert json.loads(json.dumps(pp.to_dict()))["method"] == "hutch++"


def test_trace_of_hessian_operator() -> None:
    model = mlp()
    X, y = cls_data(23)
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    H = op.dense()
    res = hbk.hessian_trace(op, num_probes=3 * op.dim, seed=0, block_size=50)
    assert res.estimate == pytest.approx(float(H.trace()), rel=1e-9)


def test_spectral_density_known_spectrum() -> None:
    A, evals = known_matrix(n=40)
    # m = dim Lanczos steps: Gauss quadrature is exact, the nodes are the eigenvalues
    sigma = 0.5
    d = hbk.spectral_density(A, num_probes=200, lanczos_steps=40, sigma=sigma, seed=0, block_size=100)
    assert d.num_matvecs == 200 * 40
    torch.testing.assert_close(d.weights.sum(1), torch.ones(200, dtype=torch.float64), atol=1e-10, rtol=0)
    heavy = d.weights > 1e-8
    dist = (d.nodes[heavy][:, None] - evals[None]).abs().min(1).values
    assert dist.max() < 1e-8
    grid = d.grid
    true = torch.exp(-0.5 * ((grid[:, None] - evals[None]) / sigma) ** 2).sum(1) / (
        len(evals) * sigma * np.sqrt(2 * np.pi))
    dx = float(grid[1] - grid[0])
    assert float(d.density.sum() * dx) == pytest.approx(1.0, abs=1e-3)
    assert float((d.density - true).abs().sum() * dx) < 0.1  # L1 distance of two densities
    # the first moment is tr(A) / n
    mean = float((d.density * grid).sum() * dx)
    assert mean == pytest.approx(float(evals.mean()), abs=0.2)


def test_spectral_density_few_steps_and_hessian() -> None:
    model = mlp()
    X, y = cls_data(23)
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    H = op.dense()
    d = hbk.spectral_density(op, num_probes=8, lanczos_steps=15, seed=0, grid=300, quiet=False)
    ev = torch.linalg.eigvalsh(H)
    # extreme Ritz values converge first: the outermost nodes are near the extreme eigenvalues
    assert abs(float(d.nodes.max()) - float(ev[-1])) < 1e-3 * float(ev.abs().max())
    assert d.grid.shape == (300,) and (d.density >= 0).all()
    assert json.loads(json.dumps(d.to_dict()))["sigma"] == d.sigma


# ----------------------------------------------------------------------------- bugs (g)
class BroadcastingOperator:
    """An operator whose block product comes back as (dim, 1): the trace of A was reported as
    0.82 for 3.45 (the (dim, 1) output broadcast against the probes)."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.dim, self.dtype = A, A.shape[0], A.dtype

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        return (self.A @ V)[:, :1]


def test_trace_refuses_a_product_of_the_wrong_shape() -> None:
    A, _ = known_matrix(n=10)
    with pytest.raises(RuntimeError, match=r"hbk.BroadcastingOperator: expected a product of shape \(10, 3\)"):
        hbk.hessian_trace(BroadcastingOperator(A), num_probes=9, block_size=3)

    class Good(BroadcastingOperator):
        def matvec(self, V):
            return self.A @ V

    res = hbk.hessian_trace(Good(A), num_probes=30, seed=0)  # foreign operators still work
    assert res.estimate == pytest.approx(float(A.trace()), abs=1e-9)


def test_spectral_density_of_a_multiple_of_the_identity() -> None:
    """spectral_density(3 * I) integrated to 0: its default width collapsed to 1e-17."""
    d = hbk.spectral_density(3 * torch.eye(12, dtype=torch.float64), num_probes=4, lanczos_steps=6, seed=0)
    assert d.sigma == pytest.approx(3e-4)
    dx = float(d.grid[1] - d.grid[0])
    assert float(d.density.sum() * dx) == pytest.approx(1.0, abs=1e-3)
    assert float(d.grid[d.density.argmax()]) == pytest.approx(3.0, abs=1e-3)
    z = hbk.spectral_density(torch.zeros(5, 5, dtype=torch.float64), num_probes=2, lanczos_steps=3, seed=0)
    assert z.sigma == 1e-3 and float(z.density.sum() * float(z.grid[1] - z.grid[0])) == pytest.approx(1.0, abs=1e-3)


def test_estimator_validation() -> None:
    op = hbk.MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="hbk.hessian_trace: expected an operator"):
        hbk.hessian_trace(object())
    with pytest.raises(ValueError, match="hbk.hessian_trace: expected method to be one of"):
        hbk.hessian_trace(op, method="exact")
    with pytest.raises(ValueError, match="expected num_probes >= 3"):
        hbk.hessian_trace(op, num_probes=2)
    with pytest.raises(TypeError, match="expected seed to be an int"):
        hbk.hessian_trace(op, seed="abc")
    with pytest.raises(ValueError, match="expected lanczos_steps <= dim = 4"):
        hbk.spectral_density(op, lanczos_steps=5)
    with pytest.raises(ValueError, match="expected sigma > 0"):
        hbk.spectral_density(op, lanczos_steps=2, sigma=0.0)
    with pytest.raises(ValueError, match="expected grid .* >= 2"):
        hbk.spectral_density(op, lanczos_steps=2, grid=1)
