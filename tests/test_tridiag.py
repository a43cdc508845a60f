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


def test_repeated_eigenvalues_cluster_invariants():
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
    r = alignment_spectrum(H, G, return_alignments=True, chunk=5)
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
               {"overwrite": True, "threads": 2, "top_vectors": 3}):
        Hc = H.clone()
        r = alignment_spectrum(Hc, G, return_alignments=True, **kw)
        torch.testing.assert_close(r.eigenvalues, base.eigenvalues, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.alignments.abs(), base.alignments.abs(), rtol=0, atol=1e-11)
        if kw.get("overwrite"):
            assert not torch.equal(Hc, keep)  # the documented memory saving really happened


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
