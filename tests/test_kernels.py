"""Every kernel against its plain-torch reference (hbkernels/reference.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from torch.func import functional_call, grad, vmap

import hbkernels as hbk
from hbkernels import reference as ref

SIZES = [(1, 1), (7, 3), (513, 130), (33, 1)]


def _randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _factors(n, layers, dtype, T=None, seed=0):
    """Random factors: layers = [(d_in, d_out, bias), ...]; T positions when given."""
    A, D, B = [], [], []
    for i, (d_in, d_out, b) in enumerate(layers):
        lead = (n,) if T is None else (n, T)
        A.append(_randn(*lead, d_in, dtype=dtype, seed=seed + 2 * i))
        D.append(_randn(*lead, d_out, dtype=dtype, seed=seed + 2 * i + 1))
        B.append(b)
    return A, D, B


def _vectors(layers, k, dtype, seed=100):
    W = [_randn(d_out, d_in, k, dtype=dtype, seed=seed + i) for i, (d_in, d_out, _) in enumerate(layers)]
    Wb = [_randn(d_out, k, dtype=dtype, seed=seed + 50 + i) if b else None
          for i, (_, d_out, b) in enumerate(layers)]
    return W, Wb


# --------------------------------------------------------------------------- dense Gram
@pytest.mark.parametrize("n,p", SIZES)
def test_gram_matches_reference(n, p, dtype):
    G = _randn(n, p, dtype=dtype)
    K = hbk.gram(G)
    assert_close_scaled(K, ref.gram(G))
    assert torch.equal(K, K.T), "the Gram matrix must be exactly symmetric"


def test_gram_noncontiguous_and_transposed(dtype):
    base = _randn(300, 1030, dtype=dtype)
    for G in (base[:, ::2], base.T[:515].contiguous().T.T, base.T.contiguous().T, base[::3]):
        assert_close_scaled(hbk.gram(G), ref.gram(G))


def test_gram_empty_and_zero_rows(dtype):
    assert hbk.gram(torch.zeros(0, 5, dtype=dtype)).shape == (0, 0)
    assert torch.equal(hbk.gram(torch.zeros(4, 0, dtype=dtype)), torch.zeros(4, 4, dtype=dtype))
    G = _randn(9, 11, dtype=dtype)
    G[3] = 0
    K = hbk.gram(G)
    assert torch.all(K[3] == 0) and torch.all(K[:, 3] == 0)


# --------------------------------------------------------------------------- cosine alignment
@pytest.mark.parametrize("n,p", SIZES)
@pytest.mark.parametrize("k", [1, 5])
def test_cosine_alignment_matches_reference(n, p, k, dtype):
    G, V = _randn(n, p, dtype=dtype), _randn(p, k, dtype=dtype, seed=1)
    C = hbk.cosine_alignment(G, V)
    assert C.shape == (n, k)
    assert_close_scaled(C, ref.cosine_alignment(G, V))


def test_cosine_alignment_large_blocks(dtype):
    # p large enough for several row blocks of G.
    G, V = _randn(700, 4099, dtype=dtype), _randn(4099, 3, dtype=dtype, seed=1)
    assert_close_scaled(hbk.cosine_alignment(G, V), ref.cosine_alignment(G, V))


def test_cosine_alignment_noncontiguous(dtype):
    G, V = _randn(200, 61, dtype=dtype), _randn(7, 61, dtype=dtype, seed=1)
    for g, v in ((G.T.contiguous().T, V.T), (G[::2, ::3], V.T[::3]), (G[:, 1:], V.T[1:])):
        assert_close_scaled(hbk.cosine_alignment(g, v), ref.cosine_alignment(g, v))


def test_cosine_alignment_zero_norms_give_zero(dtype):
    G, V = _randn(6, 10, dtype=dtype), _randn(10, 3, dtype=dtype, seed=1)
    G[2] = 0
    V[:, 1] = 0
    C = hbk.cosine_alignment(G, V)
    assert not torch.isnan(C).any()
    assert torch.all(C[2] == 0) and torch.all(C[:, 1] == 0)
    assert C.abs().max() <= 1 + 1e-6


def test_cosine_alignment_empty(dtype):
    assert hbk.cosine_alignment(torch.zeros(0, 4, dtype=dtype), torch.ones(4, 2, dtype=dtype)).shape == (0, 2)
    assert hbk.cosine_alignment(torch.ones(3, 4, dtype=dtype), torch.ones(4, 0, dtype=dtype)).shape == (3, 0)
    C = hbk.cosine_alignment(torch.ones(3, 0, dtype=dtype), torch.ones(0, 2, dtype=dtype))
    assert torch.equal(C, torch.zeros(3, 2, dtype=dtype))


def test_cosine_alignment_of_parallel_vectors_is_one(dtype):
    G = _randn(5, 8, dtype=dtype)
    C = hbk.cosine_alignment(G, (3.0 * G).T.contiguous())
    assert_close_scaled(torch.diagonal(C), torch.ones(5, dtype=dtype))


# --------------------------------------------------------------------------- ghost kernels
LAYERS = [(7, 3, True), (3, 5, False), (1, 1, True)]


@pytest.mark.parametrize("n", [1, 7, 515])
@pytest.mark.parametrize("T", [None, 4])
def test_ghost_gram_matches_reference(n, T, dtype):
    A, D, B = _factors(n, LAYERS, dtype, T=T)
    K = hbk.ghost_gram(A, D, B)
    assert_close_scaled(K, ref.ghost_gram(A, D, B))
    assert torch.equal(K, K.T)
    # ...and the dense Gram of the explicit per-sample gradients the factors stand for.
    assert_close_scaled(K, ref.gram(ref.per_sample_grads_from_factors(A, D, B)))


def test_ghost_gram_long_sequences_use_small_tiles(dtype):
    A, D, B = _factors(9, [(4, 3, True)], dtype, T=300)  # tile = 1024 // 300 = 3 samples
    assert_close_scaled(hbk.ghost_gram(A, D, B), ref.ghost_gram(A, D, B))


@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("T", [None, 3])
@pytest.mark.parametrize("k", [1, 6])
def test_ghost_dots_norms_alignment_match_reference(n, T, k, dtype):
    layers = [(9, 4, True), (4, 12, False), (5, 5, True)]  # both contraction orders
    A, D, B = _factors(n, layers, dtype, T=T)
    W, Wb = _vectors(layers, k, dtype)
    assert_close_scaled(hbk.ghost_dots(A, D, W, Wb), ref.ghost_dots(A, D, W, Wb))
    assert_close_scaled(hbk.ghost_sq_norms(A, D, B), ref.ghost_sq_norms(A, D, B))
    assert_close_scaled(hbk.ghost_alignment(A, D, W, Wb), ref.ghost_alignment(A, D, W, Wb))
    # The factored cosine equals the dense cosine of the explicit gradients.
    G = ref.per_sample_grads_from_factors(A, D, B)
    V = torch.cat([t for w, wb in zip(W, Wb) for t in ((w.reshape(-1, k),) + ((wb,) if wb is not None else ()))])
    assert_close_scaled(hbk.ghost_alignment(A, D, W, Wb), hbk.cosine_alignment(G, V))


def test_ghost_kernels_noncontiguous_factors(dtype):
    A, D, B = _factors(40, LAYERS, dtype)
    A = [a.T.contiguous().T for a in A]
    D = [torch.cat([d, d], dim=1)[:, ::2] for d in D]
    W, Wb = _vectors(LAYERS, 3, dtype)
    W = [w.permute(2, 0, 1).contiguous().permute(1, 2, 0) for w in W]
    assert_close_scaled(hbk.ghost_gram(A, D, B), ref.ghost_gram(A, D, B))
    assert_close_scaled(hbk.ghost_dots(A, D, W, Wb), ref.ghost_dots(A, D, W, Wb))


def test_ghost_kernels_empty_and_zero_rows(dtype):
    A, D, B = _factors(0, LAYERS, dtype)
    W, Wb = _vectors(LAYERS, 2, dtype)
    assert hbk.ghost_gram(A, D, B).shape == (0, 0)
    assert hbk.ghost_alignment(A, D, W, Wb).shape == (0, 2)
    A, D, B = _factors(5, LAYERS, dtype)
    for d in D:
        d[1] = 0  # sample 1 has a zero gradient
    C = hbk.ghost_alignment(A, D, W, Wb)
    assert torch.all(C[1] == 0) and not torch.isnan(C).any()
    assert hbk.ghost_sq_norms(A, D, B)[1] == 0


@pytest.mark.parametrize("n", [0, 1, 7, 131])
@pytest.mark.parametrize("T", [None, 3])
@pytest.mark.parametrize("k", [0, 1, 6])
def test_ghost_products_match_reference_and_separate_calls(n, T, k, dtype):
    layers = [(9, 4, True), (4, 12, False), (5, 5, True)]  # both contraction orders
    A, D, B = _factors(n, layers, dtype, T=T)
    W, Wb = _vectors(layers, k, dtype)
    packed = [b for b in Wb if b is not None]
    dots, sq = hbk.ghost_products(A, D, B, W, packed)
    assert dots.shape == (n, k) and sq.shape == (n,)
    assert dots.dtype == sq.dtype == dtype
    want_dots, want_sq = ref.ghost_products(A, D, B, W, packed)
    assert_close_scaled(dots, want_dots)
    assert_close_scaled(sq, want_sq)
    assert_close_scaled(dots, hbk.ghost_dots(A, D, W, Wb))
    assert_close_scaled(sq, hbk.ghost_sq_norms(A, D, B))


def test_ghost_products_mixed_2d_3d_noncontiguous(dtype):
    n, k = 29, 5
    A = [_randn(n, 6, dtype=dtype).T.contiguous().T,             # column-major
         _randn(n, 4, 2 * 7, dtype=dtype, seed=1)[:, :, ::2],     # strided last dim
         _randn(4, n, 3, dtype=dtype, seed=2).transpose(0, 1)]   # (n, T=4, 3), n not outermost
    D = [_randn(n, 2 * 5, dtype=dtype, seed=3)[:, 1::2],
         _randn(n, 4, 3, dtype=dtype, seed=4),
         _randn(n, 4, 8, dtype=dtype, seed=5)[:, :, 2:]]
    B = [True, False, True]
    W = [_randn(k, 5, 6, dtype=dtype, seed=6).permute(1, 2, 0),
         _randn(3, 7, k, dtype=dtype, seed=7),
         _randn(6, 3, 2 * k, dtype=dtype, seed=8)[:, :, ::2]]
    packed = [_randn(k, 5, dtype=dtype, seed=9).T, _randn(6, k, dtype=dtype, seed=10)]
    assert not all(t.is_contiguous() for t in A + D + W + packed)
    dots, sq = hbk.ghost_products(A, D, B, W, packed)
    want_dots, want_sq = ref.ghost_products(A, D, B, W, packed)
    assert_close_scaled(dots, want_dots)
    assert_close_scaled(sq, want_sq)
    G = ref.per_sample_grads_from_factors(A, D, B)
    assert_close_scaled(sq, G.square().sum(1))


def test_ghost_sq_norms_never_negative_for_a_cancelling_gradient():
    # T = 2 positions whose contributions cancel exactly: g_i = d a^T - d a^T = 0. The T x T
    # form sums (a.a)(d.d) terms of both signs; rounding must not leave a negative norm.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 1, 40, generator=g, dtype=torch.float32) * 3
    d = torch.randn(64, 1, 50, generator=g, dtype=torch.float32) * 7
    A, D = [torch.cat([a, a * 1.1], 1)], [torch.cat([d, -d / 1.1], 1)]
    sq = hbk.ghost_sq_norms(A, D, [False])
    assert (sq >= 0).all()
    _, sq2 = hbk.ghost_products(A, D, [False], [torch.randn(50, 40, 2, generator=g)], [])
    assert (sq2 >= 0).all()
    C = hbk.ghost_alignment(A, D, [torch.randn(50, 40, 2, generator=g)], [None])
    assert not torch.isnan(C).any()


def test_cosine_from_dots(dtype):
    dots, g, v = _randn(6, 4, dtype=dtype), _randn(6, dtype=dtype).abs(), _randn(4, dtype=dtype).abs()
    g[0], v[2] = 0, 0
    C = hbk.cosine_from_dots(dots, g, v)
    assert_close_scaled(C, ref.cosine_from_dots(dots, g, v))
    assert torch.all(C[0] == 0) and torch.all(C[:, 2] == 0)


# --------------------------------------------------------------------------- vs a real model
def test_factored_forms_match_vmap_grads_of_an_mlp(dtype):
    """Factors captured from a small MLP reproduce vmap(grad)'s per-sample gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(6, 3),
    ).to(dtype)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    X, y = torch.randn(23, 5, dtype=dtype), torch.randint(0, 3, (23,))

    # Explicit per-sample gradients with torch.func.
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, t):
        out = functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, t[None])

    per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([per[k].flatten(1) for k in params], dim=1)

    # Factors: layer inputs and gradients of the summed per-sample losses w.r.t. outputs.
    inputs, outs = [], []

    def capture(module, args, out):
        inputs.append(args[0].detach())
        outs.append(out)

    hooks = [m.register_forward_hook(capture) for m in linears]
    loss = torch.nn.functional.cross_entropy(model(X), y, reduction="sum")
    for h in hooks:
        h.remove()
    D = list(torch.autograd.grad(loss, outs))
    B = [m.bias is not None for m in linears]

    assert_close_scaled(hbk.ghost_gram(inputs, D, B), hbk.gram(G))
    assert_close_scaled(hbk.ghost_sq_norms(inputs, D, B), G.square().sum(1))
    V = _randn(G.shape[1], 4, dtype=dtype, seed=7)
    parts = hbk.unflatten_like(V, model)
    W = [parts[0], parts[2], parts[3]]  # weights of the three Linear layers
    Wb = [parts[1], None, parts[4]]  # the middle layer has no bias
    assert_close_scaled(hbk.ghost_alignment(inputs, D, W, Wb), hbk.cosine_alignment(G, V))
