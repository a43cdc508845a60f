"""hbkernels.rangespace: spectrum and alignments through the range of a low-rank H, vs eigh."""

from __future__ import annotations

import pytest
import torch

from hbkernels import rangespace
from hbkernels.rangespace import range_spectrum


def _low_rank(p, eigs, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q0 = torch.linalg.qr(torch.randn(p, len(eigs), generator=g, dtype=torch.float64)).Q
    H = Q0 @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q0.T
    return ((H + H.T) / 2).to(dtype), Q0


def _grads(Q0, n_in, n_out, seed=1):
    """Gradients: n_in inside the range of H, n_out with a component outside, one zero row."""
    g = torch.Generator().manual_seed(seed)
    p, r = Q0.shape
    inside = torch.randn(n_in, r, generator=g, dtype=torch.float64) @ Q0.T
    outside = torch.randn(n_out, p, generator=g, dtype=torch.float64)
    scales = torch.logspace(-6, 6, n_in + n_out, dtype=torch.float64)[:, None]
    return torch.cat([inside, outside, torch.zeros(1, p, dtype=torch.float64)]) * torch.cat(
        [scales, torch.ones(1, 1, dtype=torch.float64)])


def _unit(G):
    n = G.norm(dim=1, keepdim=True)
    return torch.where(n > 0, G / torch.where(n > 0, n, 1), G)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [37, 64])
def test_matches_eigh_on_a_low_rank_matrix(dtype, p):
    eigs = [5.0, 3.0, 2.9, 0.4, -0.2, -1.5, -4.0]
    H, Q0 = _low_rank(p, eigs, dtype)
    G = _grads(Q0, 5, 2).to(dtype)
    res = range_spectrum(H, G, top_vectors=3, block=4)
    assert res is not None and res.rank == len(eigs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    w, V = torch.linalg.eigh(H.double())
    ref = w.flip(0)
    assert torch.allclose(res.eigenvalues, ref, atol=tol * 5)
    # the nonzero eigenvalues in order, p - r exact zeros between positives and negatives
    assert (res.eigenvalues[4 : p - 3] == 0).all()
    # |cos| with the nonzero eigenvectors (simple eigenvalues: unique up to sign)
    C_ref = _unit(G.double()) @ V.flip(1)
    nz = ref.abs() > 1e-3
    assert torch.allclose(res.alignments[:, nz].abs(), C_ref[:, nz].abs(), atol=tol * 10)
    assert (res.alignments[:, ~nz] == 0).all()
    # null alignment: exactly the part of each unit gradient outside the range
    P = Q0 @ Q0.T
    null_ref = (_unit(G.double()) - _unit(G.double()) @ P).norm(dim=1)
    assert torch.allclose(res.null_alignment, null_ref, atol=tol * 10)
    assert res.null_alignment[:5].max() < tol * 10  # gradients in the range
    assert res.null_alignment[5:7].min() > 0.5      # random gradients are mostly outside
    assert res.null_alignment[-1] == 0              # a zero gradient
    assert res.residual < tol
    # top vectors: unit eigenvectors of the top eigenvalues
    Vt = res.vectors.double()
    assert torch.allclose(H.double() @ Vt, Vt * res.eigenvalues[:3], atol=tol * 50)


def test_top_vectors_past_the_positive_eigenvalues_are_null_then_negative():
    H, _ = _low_rank(20, [2.0, -1.0])
    res = range_spectrum(H, torch.randn(3, 20, dtype=torch.float64), top_vectors=20, block=3)
    V = res.vectors
    assert torch.allclose(V.T @ V, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H @ V, V * res.eigenvalues, atol=1e-12)
    assert res.eigenvalues[0] == pytest.approx(2.0) and res.eigenvalues[-1] == pytest.approx(-1.0)


def test_an_operator_gives_what_its_dense_matrix_gives():
    from hbkernels.operators import MatrixOperator

    H, Q0 = _low_rank(50, [4.0, 1.0, -2.0, 0.5])
    G = _grads(Q0, 3, 2)
    dense = range_spectrum(H, G, top_vectors=2, block=3)
    op = MatrixOperator(H)
    res = range_spectrum(op, G, top_vectors=2, block=3)
    assert op.num_matvecs == 6 + 32  # two blocks and the check: M from the sketch
    assert torch.allclose(res.eigenvalues, dense.eigenvalues, atol=1e-12)
    assert torch.allclose(res.alignments.abs(), dense.alignments.abs(), atol=1e-12)
    assert res.residual < 1e-10


def test_full_rank_matrix_is_left_to_the_caller():
    A = torch.randn(30, 30, dtype=torch.float64)
    assert range_spectrum(A + A.T, torch.randn(2, 30, dtype=torch.float64)) is None


def test_zero_matrix_and_empty_gradients():
    res = range_spectrum(torch.zeros(5, 5, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.float64))
    assert res.rank == 0 and (res.eigenvalues == 0).all() and res.alignments.shape == (0, 5)
    assert res.null_alignment_max == 0.0


def test_a_basis_that_misses_the_range_is_refused(monkeypatch):
    H, _ = _low_rank(30, [3.0, 2.0, 1.0])
    real = rangespace._range_basis
    monkeypatch.setattr(rangespace, "_range_basis", lambda *a: (real(*a)[0][:, :2], *real(*a)[1:]))
    with pytest.raises(ValueError, match="hbk.range_spectrum: expected the range basis to capture A"):
        range_spectrum(H, torch.randn(2, 30, dtype=torch.float64))


def test_bad_inputs_are_named():
    H, _ = _low_rank(6, [1.0])
    g = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a square A"):
        range_spectrum(H[:, :5], g)
    with pytest.raises(ValueError, match="expected G of shape"):
        range_spectrum(H, g[:, :5])
    A = H.clone()
    A[0, 1] += 1.0
    with pytest.raises(ValueError, match="expected a symmetric A"):
        range_spectrum(A, g)
    A = H.clone()
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="expected a finite A"):
        range_spectrum(A, g)
    with pytest.raises(TypeError, match="A"):
        range_spectrum(H.to(torch.int64), g)


def test_analyze_gives_the_same_measures_by_both_routes(monkeypatch):
    """An MLP on few points has a low-rank Hessian: the range route's eps, G (both rules),
    trace and eigenvalues equal the tridiagonalisation route's."""
    from hbkernels.boundary import measures as M
    from hbkernels.boundary.models import FNN2Layer

    torch.manual_seed(0)
    X = torch.randn(12, 2, dtype=torch.float64)
    y = torch.arange(12) % 3
    m = FNN2Layer(2, (40, 40), 3).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X), y).backward()
        opt.step()
    a = M.analyze(m, (X, y), keep=5)
    assert a.spectrum.method == "exact-range" and a.spectrum.rank < a.num_params // 3
    monkeypatch.setattr(rangespace, "range_spectrum", lambda *args, **kw: None)
    b = M.analyze(m, (X, y), keep=5)
    assert b.spectrum.method == "exact"
    assert a.eps.eps == pytest.approx(b.eps.eps, rel=1e-12)
    assert a.G_max.count == b.G_max.count and a.G_mean.count == b.G_mean.count
    assert a.trace == pytest.approx(b.trace, rel=1e-9)
    assert torch.allclose(a.spectrum.eigenvalues, b.spectrum.eigenvalues, atol=1e-10)
    assert a.spectrum.null_alignment_max < a.eps.eps
