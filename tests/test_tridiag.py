"""hbk.alignment_spectrum (hbkernels.tridiag) against torch.linalg.eigh + cosines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hbkernels as hbk
from hbkernels.results import load_result
from hbkernels.tridiag import AlignmentSpectrum, alignment_spectrum


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _sym(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    return (A + A.T) / 2


def _grads(n: int, p: int, seed: int, zero_rows=(1, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, n,
                                                                             dtype=torch.float64)[:, None]
    G[list(zero_rows)] = 0
    return G


def _eigh_route(H: torch.Tensor, G: torch.Tensor):
    """Ground truth: all eigenpairs (descending) and the (n, p) cosines."""
    ev, V = torch.linalg.eigh(H.double())
    ev, V = ev.flip(0), V.flip(1)
    nrm = G.double().norm(dim=1, keepdim=True)
    C = (G.double() / torch.where(nrm > 0, nrm, torch.ones_like(nrm))) @ V
    return ev, V, C


def _count(stat: torch.Tensor, eps: float, rule: str) -> int:
    return int((stat >= eps).sum()) if rule == "max" else int((stat > eps).sum())


@pytest.mark.parametrize("p,n,chunk", [(12, 5, 1024), (40, 9, 7), (300, 60, 64)])
def test_float64_matches_eigh(p, n, chunk):
    H, G = _sym(p, p), _grads(n, p, p + 1)
    ev, V, C = _eigh_route(H, G)
    r = alignment_spectrum(H, G, return_alignments=True, top_vectors=3, chunk=chunk)
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=1e-12 * ev.abs().max().item())
    torch.testing.assert_close(r.max_abs, C.abs().amax(0), rtol=0, atol=1e-11)
    torch.testing.assert_close(r.mean_abs, C.abs().mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.alignments.abs(), C.abs(), rtol=0, atol=1e-11)
    assert (r.alignments[[1, 4]] == 0).all()  # zero gradients: cosine 0
    # the top vectors are the eigenvectors (up to sign) and their signs match the alignments
    sign = torch.sign((r.vectors * V[:, :3]).sum(0))
    torch.testing.assert_close(r.vectors * sign, V[:, :3], rtol=0, atol=1e-10)
    torch.testing.assert_close(r.alignments[:, :3] * sign, C[:, :3], rtol=0, atol=1e-11)
    # G by both rules, at thresholds away from the values (a value within round-off of eps
    # could fall either way in either route)
    for rule, stat in (("max", C.abs().amax(0)), ("mean", C.abs().mean(0))):
        for eps in torch.quantile(stat, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)):
            eps = float(eps) + 1e-9
            assert r.count(eps, rule) == _count(stat, eps, rule)
    assert r.count(0.0, "max") == p and r.num_params == p and r.num_samples == n


@pytest.mark.parametrize("solver", ["stedc", "stemr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p,n", [(1, 3), (2, 5), (37, 80), (51, 9)])  # odd p, n > p and n < p
def test_solvers_match_eigh(solver, dtype, p, n):
    """Both tridiagonal solvers, both dtypes, against eigh + GEMM in float64 (H with eigenvalue
    gaps >= 2 / p, so float32 vectors are determined to ~1e-5)."""
    g = torch.Generator().manual_seed(100 * p + n)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1, 1, p, dtype=torch.float64) if p > 1 else torch.ones(1) * 0.5
    H = (Q * lam.double()) @ Q.T
    H = (H + H.T) / 2
    G = _grads(n, p, p + n, zero_rows=(0, n - 1))
    ev, V, C = _eigh_route(H, G)
    k = min(2, p)
    r = alignment_spectrum(H.to(dtype), G, return_alignments=True, top_vectors=k, solver=solver)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert r.solver == solver and not r.stemr_fallback and r.alignments.dtype == dtype
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=tol)
    torch.testing.assert_close(r.max_abs, C.abs().amax(0), rtol=0, atol=tol)
    torch.testing.assert_close(r.mean_abs, C.abs().mean(0), rtol=0, atol=tol)
    torch.testing.assert_close(r.alignments.double().abs(), C.abs(), rtol=0, atol=tol)
    assert (r.alignments[[0, n - 1]] == 0).all()  # zero gradients: cosine 0
    sign = torch.sign((r.vectors.double() * V[:, :k]).sum(0))
    torch.testing.assert_close(r.vectors.double() * sign, V[:, :k], rtol=0, atol=10 * tol)
    torch.testing.assert_close(r.alignments[:, :k].double() * sign, C[:, :k], rtol=0, atol=tol)


@pytest.mark.parametrize("solver", ["stedc", "stemr"])
def test_block_diagonal_H_splits_T(solver):
    """A block-diagonal H (blocks 30, 1, 45, 2) tridiagonalises to a T with zero off-diagonals
    at the block edges, so stedc works on the split pieces; same answer as eigh."""
    import numpy as np

    from hbkernels.tridiag import _sytrd

    sizes = (30, 1, 45, 2)
    H = torch.block_diag(*[_sym(b, 20 + b) * (1 + i) for i, b in enumerate(sizes)])
    p, n = H.shape[0], 12
    _, _, e, _ = _sytrd(np.asfortranarray(H.numpy().copy()))
    assert (np.abs(e) <= 1e-12 * float(H.abs().max())).sum() >= len(sizes) - 1  # T splits
    G = _grads(n, p, 5, zero_rows=(3,))
    ev, _, C = _eigh_route(H, G)
    gaps = (ev[:-1] - ev[1:]).min()
    assert gaps > 1e-6  # distinct eigenvalues: the per-eigenvector cosines are determined
    r = alignment_spectrum(H, G, return_alignments=True, solver=solver)
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=1e-12 * float(ev.abs().max()))
    atol = 1e-13 / float(gaps) + 1e-12
    torch.testing.assert_close(r.alignments.abs(), C.abs(), rtol=0, atol=atol)
    torch.testing.assert_close(r.max_abs, C.abs().amax(0), rtol=0, atol=atol)


@pytest.mark.parametrize("solver", ["stedc", "stemr"])
def test_repeated_eigenvalues_cluster_invariants(solver):
    """Eigenvalues with multiplicity 4 and 3: the eigenvectors inside a cluster are not unique,
    so compare each sample's squared projection on every eigenspace (basis-invariant)."""
    p, n = 30, 8
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.linspace(-3, 5, p, dtype=torch.float64)
    lam[:4] = 2.0 + 1e-3  # cluster not at the end of the order either
    lam[20:23] = -1.0
    lam[-1] = lam[-2] = 0.0
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    G = _grads(n, p, 4, zero_rows=(2,))
    ev, _, C = _eigh_route(H, G)
    r = alignment_spectrum(H, G, return_alignments=True, chunk=5, solver=solver)
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=1e-12)
    # clusters of (numerically) equal eigenvalues
    labels = torch.cumsum(torch.cat([torch.zeros(1), (ev[:-1] - ev[1:] > 1e-8).double()]), 0).long()
    assert labels.max() + 1 == p - 3 - 2 - 1
    A2 = torch.zeros(n, int(labels.max()) + 1, dtype=torch.float64).index_add_(1, labels, C**2)
    B2 = torch.zeros_like(A2).index_add_(1, labels, r.alignments**2)
    torch.testing.assert_close(B2, A2, rtol=0, atol=1e-11)
    # all of each gradient is accounted for: sum_j cos^2 = 1 (0 for the zero gradient)
    want = torch.ones(n, dtype=torch.float64)
    want[2] = 0
    torch.testing.assert_close(r.alignments.pow(2).sum(1), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [40, 300])
def test_float32_agrees_where_gaps_allow(p):
    """float32 factorisation against the float64 eigh route on a matrix with eigenvalue gaps
    >= 1e-2 |H| (float32 eigenvectors are determined to ~eps32 |H| / gap)."""
    g = torch.Generator().manual_seed(p)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1, 1, p, dtype=torch.float64) * (p / 40)
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    G = _grads(30, p, 7)
    ev, _, C = _eigh_route(H, G)
    r = alignment_spectrum(H.float(), G.float(), return_alignments=True)
    assert r.dtype == "float32" and r.alignments.dtype == torch.float32
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=3e-6 * ev.abs().max().item())
    torch.testing.assert_close(r.max_abs, C.abs().amax(0), rtol=0, atol=2e-4)
    torch.testing.assert_close(r.mean_abs, C.abs().mean(0), rtol=0, atol=2e-4)
    # float32 from a float64 H via dtype=
    r2 = alignment_spectrum(H, G, dtype=torch.float32)
    torch.testing.assert_close(r2.max_abs, C.abs().amax(0), rtol=0, atol=2e-4)
    stat = C.abs().amax(0)
    eps = float(torch.quantile(stat, 0.5))
    margin = (stat - eps).abs().min().item()
    if margin > 1e-3:  # no value within float32 round-off of eps
        assert r.count(eps) == _count(stat, eps, "max")


def test_overwrite_threads_and_chunks_same_answer(monkeypatch):
    import hbkernels.tridiag as td

    monkeypatch.setattr(td, "_PARALLEL_MIN_P", 0)  # threads=2 runs stemr beside ormtr
    p, n = 80, 10
    H, G = _sym(p, 11), _grads(n, p, 12)
    keep = H.clone()
    base = alignment_spectrum(H, G, return_alignments=True)
    assert torch.equal(H, keep)  # overwrite=False leaves H alone
    for kw in ({"chunk": 9, "threads": 2}, {"chunk": 1}, {"overwrite": True},
               {"overwrite": True, "threads": 2, "top_vectors": 3},
               {"threads": 2, "solver": "stemr"},
               {"overwrite": True, "threads": 2, "top_vectors": 3, "solver": "stemr"}):
        Hc = H.clone()
        r = alignment_spectrum(Hc, G, return_alignments=True, **kw)
        torch.testing.assert_close(r.eigenvalues, base.eigenvalues, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.alignments.abs(), base.alignments.abs(), rtol=0, atol=1e-11)
        if kw.get("overwrite"):
            assert not torch.equal(Hc, keep)  # the documented memory saving really happened


def test_stedc_failure_falls_back_to_stemr(monkeypatch):
    import hbkernels.tridiag as td

    real = td._lapack

    def failing(name, nargs):
        if name != "dstedc":
            return real(name, nargs)

        def f(*args):  # report a failure the way LAPACK does: INFO > 0
            args[-1]._obj.value = 1

        return f

    H, G = _sym(20, 3), _grads(6, 20, 4)
    ev, _, C = _eigh_route(H, G)
    monkeypatch.setattr(td, "_lapack", failing)
    r = alignment_spectrum(H, G, return_alignments=True)
    assert r.stemr_fallback and r.solver == "stedc"
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.alignments.abs(), C.abs(), rtol=0, atol=1e-11)


def test_real_hessian_and_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X = torch.randn(40, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    H = hbk.exact_hessian(model, nn.CrossEntropyLoss(), (X, y))
    G = hbk.per_sample_grads(model, X, labels="pred")
    ev, _, C = _eigh_route(H, G)
    r = alignment_spectrum(H, G)
    torch.testing.assert_close(r.eigenvalues, ev, rtol=0, atol=1e-12 * ev.abs().max().item())
    # eigenvalues with gaps below 1e-8 |H| have arbitrary vectors: compare the rest
    gap = torch.minimum(torch.cat([ev[:1] * 0 + 1e9, ev[:-1] - ev[1:]]),
                        torch.cat([ev[:-1] - ev[1:], ev[:1] * 0 + 1e9]))
    ok = gap > 1e-8 * ev.abs().max()
    assert ok.sum() > 10
    torch.testing.assert_close(r.max_abs[ok], C.abs().amax(0)[ok], rtol=0, atol=1e-8)


def test_save_load_roundtrip(tmp_path):
    H, G = _sym(10, 1), _grads(4, 10, 2, zero_rows=())
    r = alignment_spectrum(H, G, return_alignments=True)
    back = load_result(r.save(tmp_path / "a.json"))
    assert isinstance(back, AlignmentSpectrum)
    assert torch.equal(back.max_abs, r.max_abs) and torch.equal(back.alignments, r.alignments)
    assert set(r.to_dict()) >= {"max_abs", "mean_abs", "top_eigenvalues", "seconds"}


def test_bad_arguments():
    H, G = _sym(6, 0), _grads(3, 6, 0, zero_rows=())
    bad = [
        ((H[:, :5], G), {}, ValueError, "square H"),
        ((H, G[:, :5]), {}, ValueError, r"grads of shape \(n >= 1, 6\)"),
        ((H, G[:0]), {}, ValueError, "grads of shape"),
        ((H + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1), G), {}, ValueError, "symmetric H"),
        ((H.long(), G), {}, TypeError, "float32 or float64"),
        ((H, G.long()), {}, TypeError, "floating-point"),
        ((H.numpy(), G), {}, TypeError, "torch.Tensor"),
        ((H, G * float("nan")), {}, ValueError, "finite grads"),
        ((H * float("inf"), G), {}, ValueError, "finite H"),
        ((H, G), {"chunk": 0}, ValueError, "chunk >= 1"),
        ((H, G), {"top_vectors": 7}, ValueError, "top_vectors <= 6"),
        ((H, G), {"dtype": torch.float16}, TypeError, "dtype float32 or float64"),
        ((H, G), {"return_alignments": 1}, TypeError, "True or False"),
        ((H, G), {"solver": "dsyev"}, ValueError, r"solver to be one of \('stedc', 'stemr'\)"),
    ]
    for args, kw, exc, msg in bad:
        with pytest.raises(exc, match=r"hbk.alignment_spectrum: expected .*" + msg):
            alignment_spectrum(*args, **kw)
    r = alignment_spectrum(H, G)
    with pytest.raises(ValueError, match="hbk.AlignmentSpectrum.count: expected rule"):
        r.count(0.1, "median")
    with pytest.raises(ValueError, match="eps >= 0"):
        r.count(-1.0)


def test_analyze_uses_the_tridiagonal_route_with_the_same_answer():
    """boundary.analyze over an exact spectrum (n <= p) takes the tridiagonal route; with a
    precomputed eigh spectrum it takes the eigh route: same eps, G (both rules), eigenvalues,
    trace and kept alignments (up to eigenvector signs)."""
    from hbkernels.boundary import measures as M

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 3))
    X = torch.randn(30, 2)
    y = torch.randint(0, 3, (30,))
    fast = M.analyze(model, "ce", (X, y), keep=5)
    m64 = M.as_dtype_model(model, torch.float64)
    spec = M.compute_spectrum(m64, (X, y))
    slow = M.analyze(model, "ce", (X, y), keep=5, spectrum=spec)
    assert fast.spectrum.eigenvectors.shape == (spec.num_params, 5)  # no p x p eigenvectors
    torch.testing.assert_close(fast.spectrum.eigenvalues, spec.eigenvalues, rtol=0, atol=1e-12)
    assert fast.eps.eps == slow.eps.eps and fast.trace == pytest.approx(slow.trace, abs=1e-12)
    assert fast.G_max.count == slow.G_max.count and fast.G_mean.count == slow.G_mean.count
    assert 0 < fast.G_max.count < spec.num_params
    sign = torch.sign((fast.spectrum.eigenvectors * spec.eigenvectors[:, :5]).sum(0))
    torch.testing.assert_close(fast.spectrum.eigenvectors * sign, spec.eigenvectors[:, :5],
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.alignments * sign, slow.alignments, rtol=0, atol=1e-9)


def test_peak_bytes_follows_the_documented_formula():
    """Module docstring: b max(s p^2 + n p + K, p^2 + n p + (p + 2 n) c [+ n p]) + 8 n p."""
    p, n, c = 50, 7, 16
    H, G = _sym(p, 8), _grads(n, p, 9)
    for solver, s in (("stedc", 2), ("stemr", 1)):
        for kw, K, extra in (({}, 0, 0), ({"top_vectors": 2}, p * p, 0),
                             ({"return_alignments": True}, 0, n * p)):
            r = alignment_spectrum(H, G, chunk=c, solver=solver, **kw)
            want = 8 * max(s * p * p + n * p + K, p * p + n * p + (p + 2 * n) * c + extra,
                           p * p + n * p + K + p * kw.get("top_vectors", 0) * (K > 0))
            assert r.peak_bytes == want + 8 * n * p, (solver, kw)
