"""Property tests: every kernel on random shapes, strides, dtypes and values vs reference.py.

Hypothesis draws the sizes (empty ones included), the memory layout of every tensor (permuted
storage, strided slices, offsets), the dtype, the value scale, zero rows/samples (the zero-norm
convention) and a NaN entry (NaN in, NaN out). Bounded and derandomized: a fixed set of
examples per test, the whole file in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hbkernels as hbk
from hbkernels import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64])
SCALES = st.sampled_from([1e-3, 1.0, 1e3])


@st.composite
def tensors(draw, shape, dtype, scale=1.0):
    """A random tensor of ``shape`` with a random layout: its storage dims permuted, every dim
    strided by 1 or 2, and an optional offset into a larger buffer."""
    nd = len(shape)
    perm = draw(st.permutations(range(nd))) if nd else []
    steps = [draw(st.sampled_from([1, 2])) for _ in range(nd)]
    off = draw(st.sampled_from([0, 1]))
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = [shape[i] * steps[i] + off for i in range(nd)]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn([sizes[p] for p in perm], generator=g, dtype=dtype) * scale
    inv = [perm.index(i) for i in range(nd)]
    t = base.permute(inv) if nd else base
    return t[tuple(slice(off, off + shape[i] * steps[i], steps[i]) for i in range(nd))]


def _compare(actual, expected):
    """Close relative to the largest finite magnitude; NaN exactly where the reference has it."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    rtol = 2e-4 if expected.dtype == torch.float32 else 1e-10
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               equal_nan=True)


def _maybe_nan(draw, t: torch.Tensor) -> None:
    """Put a NaN into one entry of ``t`` (in place), sometimes."""
    if t.numel() and draw(st.integers(0, 4)) == 0:
        idx = tuple(draw(st.integers(0, s - 1)) for s in t.shape)
        t[idx] = float("nan")


def _maybe_zero_row(draw, t: torch.Tensor, dim: int = 0) -> None:
    if t.shape[dim] and draw(st.booleans()):
        t.select(dim, draw(st.integers(0, t.shape[dim] - 1))).zero_()


# --------------------------------------------------------------------------- dense kernels
@SETTINGS
@given(data=st.data(), n=st.integers(0, 40), p=st.integers(0, 40), dtype=DTYPES, scale=SCALES)
def test_gram(data, n, p, dtype, scale):
    G = data.draw(tensors((n, p), dtype, scale))
    _maybe_zero_row(data.draw, G)
    _maybe_nan(data.draw, G)
    K = hbk.gram(G)
    _compare(K, ref.gram(G))
    assert torch.equal(K.nan_to_num(7.0), K.T.nan_to_num(7.0))  # exactly symmetric


@SETTINGS
@given(data=st.data(), n=st.integers(0, 30), p=st.integers(0, 30), k=st.integers(0, 6),
       dtype=DTYPES, scale=SCALES)
def test_cosine_alignment(data, n, p, k, dtype, scale):
    G = data.draw(tensors((n, p), dtype, scale))
    V = data.draw(tensors((p, k), dtype))
    _maybe_zero_row(data.draw, G)
    _maybe_zero_row(data.draw, V, 1)
    _maybe_nan(data.draw, G)
    C = hbk.cosine_alignment(G, V)
    _compare(C, ref.cosine_alignment(G, V))
    assert (C[~C.isnan()].abs() <= 1 + 1e-5).all()


@SETTINGS
@given(data=st.data(), n=st.integers(0, 30), k=st.integers(0, 6), dtype=DTYPES)
def test_cosine_from_dots(data, n, k, dtype):
    dots = data.draw(tensors((n, k), dtype))
    g = data.draw(tensors((n,), dtype)).abs()
    v = data.draw(tensors((k,), dtype)).abs()
    _maybe_zero_row(data.draw, g)
    _maybe_zero_row(data.draw, v)
    _maybe_nan(data.draw, g)
    _maybe_nan(data.draw, dots)
    _compare(hbk.cosine_from_dots(dots, g, v), ref.cosine_from_dots(dots, g, v))


# --------------------------------------------------------------------------- ghost kernels
@st.composite
def factor_sets(draw, with_vectors: bool):
    """Per-layer factors (2-D or 3-D, random layouts), bias flags and (optionally) vectors."""
    dtype, scale = draw(DTYPES), draw(SCALES)
    n, layers, k = draw(st.integers(0, 12)), draw(st.integers(1, 3)), draw(st.integers(0, 4))
    A, D, B, W, Wb = [], [], [], [], []
    for _ in range(layers):
        T = draw(st.sampled_from([None, 1, 2, 4]))
        d_in, d_out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        lead = (n,) if T is None else (n, T)
        A.append(draw(tensors(lead + (d_in,), dtype, scale)))
        D.append(draw(tensors(lead + (d_out,), dtype)))
        B.append(draw(st.booleans()))
        if with_vectors:
            W.append(draw(tensors((d_out, d_in, k), dtype)))
            Wb.append(draw(tensors((d_out, k), dtype)) if B[-1] else None)
    if n and draw(st.booleans()):  # a sample with a zero gradient
        i = draw(st.integers(0, n - 1))
        for d in D:
            d[i].zero_()
    if draw(st.integers(0, 4)) == 0:
        _maybe_nan(draw, A[draw(st.integers(0, layers - 1))])
    return A, D, B, W, Wb


@SETTINGS
@given(f=factor_sets(with_vectors=False))
def test_ghost_gram_and_sq_norms(f):
    A, D, B, _, _ = f
    K = hbk.ghost_gram(A, D, B)
    _compare(K, ref.ghost_gram(A, D, B))
    assert torch.equal(K.nan_to_num(7.0), K.T.nan_to_num(7.0))
    sq = hbk.ghost_sq_norms(A, D, B)
    _compare(sq, ref.ghost_sq_norms(A, D, B))
    assert (sq[~sq.isnan()] >= 0).all()


@SETTINGS
@given(f=factor_sets(with_vectors=True))
def test_ghost_dots_products_alignment(f):
    A, D, B, W, Wb = f
    _compare(hbk.ghost_dots(A, D, W, Wb), ref.ghost_dots(A, D, W, Wb))
    packed = [b for b in Wb if b is not None]
    dots, sq = hbk.ghost_products(A, D, B, W, packed)
    want_dots, want_sq = ref.ghost_products(A, D, B, W, packed)
    _compare(dots, want_dots)
    _compare(sq, want_sq)
    C = hbk.ghost_alignment(A, D, W, Wb)
    _compare(C, ref.ghost_alignment(A, D, W, Wb))
    assert (C[~C.isnan()].abs() <= 1 + 1e-4).all()
