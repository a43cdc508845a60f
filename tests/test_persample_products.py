"""One pass, many products (hbkernels/persample/products.py, api.py) against vmap(grad)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from persample_refs import STRATEGIES, Scale, mlp, pred, ref_cosine, ref_grads, small_cnn
from torch import nn

import hbkernels as hbk

pytestmark = pytest.mark.usefixtures("one_thread")


def test_alignment_vector_shapes_and_zero_gradients():
    torch.manual_seed(14)
    model = mlp(widths=(6,), bias=False).double()
    X = torch.randn(5, 2, dtype=torch.float64)
    X[2] = 0.0  # no bias, ReLU'(0) = 0: g = 0 exactly
    G = ref_grads(model, X, pred(model, X))
    assert G[2].abs().max() == 0
    v = torch.randn(G.shape[1], dtype=torch.float64)
    c = hbk.gradient_alignment(model, X, v)
    assert c.shape == (5,)
    assert_close_scaled(c, ref_cosine(G, v[:, None])[:, 0])
    assert c[2] == 0
    V = torch.randn(G.shape[1], 3, dtype=torch.float64)
    V[:, 1] = 0  # a zero vector gives 0 too
    for s in STRATEGIES:
        C = hbk.gradient_alignment(model, X, V, strategy=s)
        assert torch.isfinite(C).all() and (C[2] == 0).all() and (C[:, 1] == 0).all()
        assert_close_scaled(C, ref_cosine(G, V))
    assert hbk.gradient_norms(model, X)[2] == 0


def test_alignment_with_all_eigenvectors_picks_materialisation():
    """k = p orthonormal vectors: sum_j cos^2 = 1 for every sample."""
    torch.manual_seed(15)
    model = mlp(widths=(8, 8)).double()
    p = hbk.num_params(model)
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))
    X = torch.randn(6, 2, dtype=torch.float64)
    C = hbk.gradient_alignment(model, X, Q, block_size=4)
    assert_close_scaled(C.square().sum(1), torch.ones(6, dtype=torch.float64))
    assert_close_scaled(C, ref_cosine(ref_grads(model, X, pred(model, X)), Q))


def _models(dtype):
    torch.manual_seed(17)
    return [
        (mlp(widths=(6, 5)).to(dtype), torch.randn(11, 2, dtype=dtype)),
        (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                       nn.Linear(48, 4), Scale(4), nn.Linear(4, 3)).to(dtype),
         torch.randn(7, 2, 4, 4, dtype=dtype)),
    ]


def test_gram_recompute_path_matches(dtype):
    """A budget too small for the compact store: block pairs are recomputed."""
    for model, X in _models(dtype):
        G = ref_grads(model, X, pred(model, X))
        for s in STRATEGIES:
            K = hbk.gradient_gram(model, X, strategy=s, block_size=3, memory_budget=64)
            assert_close_scaled(K, G @ G.T)
            assert torch.equal(K, K.T)


@pytest.mark.parametrize("budget", [None, 64], ids=["store", "recompute"])
def test_one_pass_products_match_the_references(budget, dtype):
    """Norms, two vector sets (one 1-D), Gram and per-class Grams from one call."""
    rtol = 2e-4 if dtype == torch.float32 else 1e-9
    for model, X in _models(dtype):
        y = pred(model, X)
        G = ref_grads(model, X, y)
        gen = torch.Generator().manual_seed(1)
        E = torch.randn(G.shape[1], 3, generator=gen, dtype=torch.float64).to(dtype)
        r = torch.randn(G.shape[1], generator=gen, dtype=torch.float64).to(dtype)
        for s in STRATEGIES:
            P = hbk.per_sample_products(model, X, norms=True, vectors={"eig": E, "rand": r},
                                        gram=True, class_gram=True, strategy=s, block_size=3,
                                        memory_budget=budget)
            assert_close_scaled(P.norms, G.norm(dim=1))
            assert_close_scaled(P.alignment["eig"], ref_cosine(G, E), rtol=rtol)
            assert P.alignment["rand"].shape == (X.shape[0],)
            assert_close_scaled(P.alignment["rand"], ref_cosine(G, r[:, None])[:, 0], rtol=rtol)
            assert_close_scaled(P.gram, G @ G.T)
            assert torch.equal(P.labels, y)
            assert sorted(P.class_gram) == sorted(set(y.tolist()))
            for c, K in P.class_gram.items():
                idx = (y == c).nonzero().flatten()
                assert torch.equal(P.class_index[c], idx)
                assert_close_scaled(K, G[idx] @ G[idx].T)
            Q = hbk.per_sample_products(model, X, class_gram=True, strategy=s, block_size=3,
                                        memory_budget=budget)
            assert Q.gram is None and Q.norms is None and Q.alignment is None
            for c, K in Q.class_gram.items():
                assert_close_scaled(K, P.class_gram[c])


def test_one_pass_captures_each_block_once(monkeypatch):
    """With the store: one capture per block for norms + alignment + Gram + per-class Gram."""
    from hbkernels.persample.engine import Engine

    calls = []
    orig = Engine.capture
    monkeypatch.setattr(Engine, "capture", lambda self, s, e: calls.append(s) or orig(self, s, e))
    torch.manual_seed(2)
    model = small_cnn().double()
    X = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    V = torch.randn(hbk.num_params(model), 2, dtype=torch.float64)
    hbk.per_sample_products(model, X, norms=True, vectors=V, gram=True, class_gram=True,
                            block_size=4)
    assert calls == [0, 4, 8]


@pytest.mark.parametrize("budget", [None, 64], ids=["store", "recompute"])
def test_covariance_eigs_match_dense_eigh(budget, dtype):
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4),
                          nn.Tanh(), Scale(4), nn.Linear(4, 3)).to(dtype)
    X = torch.randn(9, 1, 6, 6, dtype=dtype)
    G = ref_grads(model, X, pred(model, X)).double()
    evals, evecs = torch.linalg.eigh(G.T @ G / 9)
    k = 4
    ref_vals, ref_vecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    for s in STRATEGIES:
        lam, V = hbk.gradient_covariance_eigs(model, X, k, strategy=s, block_size=4,
                                              memory_budget=budget)
        assert lam.shape == (k,) and V.shape == (G.shape[1], k) and V.dtype == dtype
        assert_close_scaled(lam.double(), ref_vals, rtol=1e-4 if dtype == torch.float32 else 1e-9)
        gaps = (ref_vals[:-1] - ref_vals[1:]) / ref_vals[0]
        assert gaps.min() > 1e-3
        signs = torch.sign((V.double() * ref_vecs).sum(0))
        tol = 5e-3 if dtype == torch.float32 else 1e-7
        torch.testing.assert_close(V.double() * signs, ref_vecs, atol=tol, rtol=0)


def test_covariance_eigs_rank_deficient():
    """k = n > rank: the missing directions come back as 0 with zero columns."""
    torch.manual_seed(19)
    model = mlp(widths=(5,)).double()
    X = torch.randn(3, 2, dtype=torch.float64)
    X = torch.cat([X, X[:1]])  # a repeated sample: rank 3
    lam, V = hbk.gradient_covariance_eigs(model, X, 4)
    assert lam[3] == 0 and (V[:, 3] == 0).all()
    assert_close_scaled(V[:, :3].T @ V[:, :3], torch.eye(3, dtype=torch.float64))


def test_products_errors():
    model = mlp().double()
    X = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="hbk.per_sample_products: expected vectors to be"):
        hbk.per_sample_products(model, X, vectors=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"expected vectors\['a'\] of shape"):
        hbk.per_sample_products(model, X, vectors={"a": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="integer class labels"):
        hbk.per_sample_products(model, X, class_gram=True, labels=torch.rand(4, 3).double(),
                                loss="mse")


def test_products_result_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    model = mlp(widths=(5,), act=nn.Tanh).double()
    X = torch.randn(6, 2, dtype=torch.float64)
    V = torch.randn(hbk.num_params(model), 2, dtype=torch.float64)
    P = hbk.per_sample_products(model, X, norms=True, vectors=V, class_gram=True)
    Q = hbk.PerSampleProducts.load(P.save(tmp_path / "p.json"))
    assert torch.equal(Q.norms, P.norms) and torch.equal(Q.alignment["vectors"],
                                                         P.alignment["vectors"])
    assert Q.class_gram.keys() == P.class_gram.keys() and Q.gram is None
    for c in P.class_gram:
        assert torch.equal(Q.class_gram[c], P.class_gram[c])


def test_float64_eigenvectors_align_with_a_float32_model():
    """hessian_eigs returns float64 eigenvectors (the Lanczos basis); a float32 model's
    alignment takes them as they are (cast column-wise, scaled so nothing underflows)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(20, 2), torch.randint(0, 3, (20,))
    res = hbk.hessian_eigs(m, F.cross_entropy, (X, y), k=3, quiet=True)
    assert res.eigenvectors.dtype == torch.float64
    ref = hbk.gradient_alignment(m, X, res.eigenvectors.float())
    torch.testing.assert_close(hbk.gradient_alignment(m, X, res.eigenvectors), ref)
    tiny = hbk.gradient_alignment(m, X, res.eigenvectors * 1e-300)  # 0 in float32 if cast bare
    torch.testing.assert_close(tiny, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="floating-point"):
        hbk.gradient_alignment(m, X, torch.ones(res.eigenvectors.shape, dtype=torch.long))
