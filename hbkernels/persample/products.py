"""One pass, many products: norms, dots/cosines with vector sets, Gram, per-class Gram, ``G^T U``.

Every product is a sum over the factor pairs (ghost kernels, or the pair's materialised block
times dense GEMMs) and the dense columns (materialised pairs and fallback parameters). One
capture per sample block serves all the products asked for; the Gram keeps the compact
per-sample factors of all n samples when they fit the memory budget (each kernel then runs
once) and otherwise recomputes block pairs (``b (b + 1) / 2`` captures for ``b`` blocks).
Products are computed on scaled factors (:mod:`.engine`) and unscaled in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .engine import Engine, Factors

__all__ = ["PassResult", "Store", "VectorSet", "add_gtu", "column_sq_norms", "run_pass"]

# Elements of the (rows, T, d, k) temporaries of tiled products.
_TEMP_ELEMS = 1 << 22
# Column peaks outside [2^-_SAFE, 2^_SAFE] are rescaled before the kernels.
_SAFE = 60


def column_sq_norms(V: torch.Tensor) -> torch.Tensor:
    """``|v_j|^2`` of a row-major (p, k) matrix, in row chunks (a dim-0 reduction over the whole
    matrix is strided and several times slower for large k)."""
    rows = max(1, _TEMP_ELEMS // max(V.shape[1], 1))
    vsq = V[:rows].square().sum(0)
    for r0 in range(rows, V.shape[0], rows):
        vsq += V[r0 : r0 + rows].square().sum(0)
    return vsq


class VectorSet:
    """Vectors ``(p, K)`` (several sets side by side) prepared for the kernels once per call.

    Columns whose largest entry is far from 1 are rescaled by a power of two (cosines do not
    change), so squared norms and dots neither underflow nor overflow.

    Args:
        eng: the engine (pairs, dtype).
        V: ``(p, K)`` contiguous, the parameters' dtype and device.
    """

    def __init__(self, eng: Engine, V: torch.Tensor) -> None:
        peak = _column_peaks(V)
        _, e = torch.frexp(peak)
        bad = torch.isfinite(peak) & (peak > 0) & (e.abs() > _SAFE)
        if bool(bad.any()):
            e = torch.where(bad, e, 0)
            V = V * torch.ldexp(torch.ones_like(peak), -e)
        self.V = V.contiguous()
        self.k = V.shape[1]
        self.vsq = column_sq_norms(self.V)
        idx = eng.ghost_index()
        k = self.k
        qs = [eng.pairs[j] for j in idx]
        self.W = [self.V[q.w_offset : q.w_offset + q.p_weight].view(q.d_out, q.d_in, k) for q in qs]
        self.Wb = [self.V[q.b_offset : q.b_offset + q.d_out] for q in qs if q.has_bias]


def _column_peaks(V: torch.Tensor) -> torch.Tensor:
    rows = max(1, _TEMP_ELEMS // max(V.shape[1], 1))
    peak = V[:rows].abs().amax(0)
    for r0 in range(rows, V.shape[0], rows):
        peak = torch.maximum(peak, V[r0 : r0 + rows].abs().amax(0))
    return peak


# ----------------------------------------------------------------------------- per block
def block_products(eng: Engine, f: Factors, dense: torch.Tensor | None,
                   vs: VectorSet | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled squared norms ``(nb,)`` and dots ``(nb, K)`` (None without vectors) of a block:
    one kernel call over the ghost pairs, GEMMs over the dense columns."""
    idx, A, D = eng.ghost_factors(f)
    flags = [eng.pairs[j].has_bias for j in idx]
    dots = None
    if idx and vs is not None:
        dots, gsq = ops.ghost_products(A, D, flags, vs.W, vs.Wb)
    elif idx:
        gsq = ops.ghost_sq_norms(A, D, flags)
    else:
        gsq = torch.zeros(f.n, dtype=eng.dtype, device=eng.device)
    if vs is not None and dots is None:
        dots = torch.zeros(f.n, vs.k, dtype=eng.dtype, device=eng.device)
    if dense is not None and dense.shape[1]:
        gsq += torch.linalg.vector_norm(dense, dim=1).square_()
        if vs is not None:
            for col, p0, size in eng.layout.runs:
                dots.addmm_(dense[:, col : col + size], vs.V[p0 : p0 + size])
    return gsq, dots


def gram_of(eng: Engine, A: list, D: list, dense: torch.Tensor | None, n: int) -> torch.Tensor:
    """``G G^T`` of samples whose ghost factors (all pairs' lists, None for dense pairs) and dense
    columns are given."""
    idx = eng.ghost_index()
    K = None
    if idx:
        Ag = [A[j][:, 0] if eng.pairs[j].T == 1 else A[j] for j in idx]
        Dg = [D[j][:, 0] if eng.pairs[j].T == 1 else D[j] for j in idx]
        K = ops.ghost_gram(Ag, Dg, [eng.pairs[j].has_bias for j in idx])
    if dense is not None and dense.shape[1]:
        Kd = ops.gram(dense)
        K = Kd if K is None else K.add_(Kd)
    if K is None:
        K = torch.zeros(n, n, dtype=eng.dtype, device=eng.device)
    return K


def cross_gram(eng: Engine, fi: Factors, fj: Factors) -> torch.Tensor:
    """``G_I G_J^T`` restricted to the ghost pairs, in tiles of bounded size."""
    ni, nj = fi.n, fj.n
    K = torch.zeros(ni, nj, dtype=eng.dtype, device=eng.device)
    for j in eng.ghost_index():
        q = eng.pairs[j]
        T = q.T
        Ai, Di, Aj, Dj = fi.A[j], fi.D[j], fj.A[j], fj.D[j]
        if T == 1:
            aa = Ai[:, 0] @ Aj[:, 0].T
            if q.has_bias:
                aa += 1
            K.addcmul_(aa, Di[:, 0] @ Dj[:, 0].T)
            continue
        rows = max(1, _TEMP_ELEMS // (T * T * nj))
        Ai2, Di2 = Ai.reshape(ni * T, -1), Di.reshape(ni * T, -1)
        Aj2, Dj2 = Aj.reshape(nj * T, -1), Dj.reshape(nj * T, -1)
        for r0 in range(0, ni, rows):
            r1 = min(ni, r0 + rows)
            aa = Ai2[r0 * T : r1 * T] @ Aj2.T
            aa.mul_(Di2[r0 * T : r1 * T] @ Dj2.T)
            K[r0:r1] += aa.view(r1 - r0, T, nj, T).sum((1, 3))
        if q.has_bias:
            K.addmm_(Di.sum(1), Dj.sum(1).T)
    return K


def add_gtu(eng: Engine, f: Factors | Store, dense: torch.Tensor | None, U: torch.Tensor,
            V: torch.Tensor) -> None:
    """``V += G^T U`` for samples with factors ``f`` (``U``: ``(nb, k)``; ``G`` as scaled in
    ``f``)."""
    k = U.shape[1]
    nb = U.shape[0]
    for j in eng.ghost_index():
        q = eng.pairs[j]
        a, d, T = f.A[j], f.D[j], q.T
        Vw = V[q.w_offset : q.w_offset + q.p_weight].view(q.d_out, q.d_in, k)
        rows = max(1, _TEMP_ELEMS // (T * q.d_out * k))
        for r0 in range(0, nb, rows):
            r1 = min(nb, r0 + rows)
            du = d[r0:r1, :, :, None] * U[r0:r1, None, None, :]  # (r, T, d_out, k)
            m = du.reshape(-1, q.d_out * k).T @ a[r0:r1].reshape(-1, q.d_in)  # (d_out k, d_in)
            Vw += m.view(q.d_out, k, q.d_in).transpose(1, 2)
        if q.has_bias:
            V[q.b_offset : q.b_offset + q.d_out] += d.sum(1).T @ U
    if dense is not None:
        for col, p0, size in eng.layout.runs:
            V[p0 : p0 + size].addmm_(dense[:, col : col + size].T, U)


# ----------------------------------------------------------------------------- the store
@dataclass
class Store:
    """Compact per-sample gradients of all n samples: ghost factors plus dense columns."""

    A: list[torch.Tensor | None]
    D: list[torch.Tensor | None]
    dense: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def nbytes(eng: Engine) -> int:
        compact = sum(q.T * (q.d_in + q.d_out) for j, q in enumerate(eng.pairs) if eng.ghost[j])
        return eng.n * (compact + eng.layout.width) * eng.elem

    @classmethod
    def empty(cls, eng: Engine) -> Store:
        n, dt, dev = eng.n, eng.dtype, eng.device
        A = [torch.empty(n, q.T, q.d_in, dtype=dt, device=dev) if eng.ghost[j] else None
             for j, q in enumerate(eng.pairs)]
        D = [torch.empty(n, q.T, q.d_out, dtype=dt, device=dev) if eng.ghost[j] else None
             for j, q in enumerate(eng.pairs)]
        dense = torch.empty(n, eng.layout.width, dtype=dt, device=dev)
        return cls(A, D, dense, torch.ones(n, dtype=torch.float64, device=dev))

    def put(self, s: int, e: int, f: Factors, dense: torch.Tensor | None) -> None:
        for j in range(len(self.A)):
            if self.A[j] is not None:
                self.A[j][s:e] = f.A[j]
                self.D[j][s:e] = f.D[j]
        if dense is not None and dense.shape[1] and dense.data_ptr() != self.dense[s:e].data_ptr():
            self.dense[s:e] = dense
        self.scale[s:e] = f.scale

    def select(self, idx: torch.Tensor) -> Store:
        """The store of the samples ``idx``."""
        pick = lambda t: None if t is None else t.index_select(0, idx)
        return Store([pick(a) for a in self.A], [pick(d) for d in self.D],
                     self.dense.index_select(0, idx), self.scale.index_select(0, idx))


def unscale_gram_(K: torch.Tensor, si: torch.Tensor, sj: torch.Tensor) -> torch.Tensor:
    """``K_ij / (s_i s_j)`` in float64, in row chunks; in place, returns ``K``."""
    if bool((si == 1).all()) and bool((sj == 1).all()):
        return K
    inv_j = 1.0 / sj
    rows = max(1, _TEMP_ELEMS // max(K.shape[1], 1))
    for r0 in range(0, K.shape[0], rows):
        r1 = min(K.shape[0], r0 + rows)
        K[r0:r1] = K[r0:r1].double() * (1.0 / si[r0:r1])[:, None] * inv_j[None, :]
    return K


# ----------------------------------------------------------------------------- the pass
@dataclass
class PassResult:
    """Raw products of one pass (scaled where stated)."""

    gsq: torch.Tensor | None  # (n,) scaled squared norms
    dots: torch.Tensor | None  # (n, K) scaled dots
    scale: torch.Tensor  # (n,) float64
    targets: list[torch.Tensor]  # per block
    gram: torch.Tensor | None  # (n, n) unscaled
    store: Store | None


def run_pass(eng: Engine, *, norms: bool = False, vectors: VectorSet | None = None,
             gram: bool = False, keep_store: bool = False) -> PassResult:
    """One pass over the sample blocks computing what is asked for.

    Args:
        eng: the engine (its plan was made for these products).
        norms: squared norms.
        vectors: dots with these vectors (squared norms come with them).
        gram: the ``(n, n)`` Gram.
        keep_store: keep the compact factors of all samples when they fit the budget (for a
            second stage: per-class Grams, ``G^T U``).
    """
    n, dt, dev = eng.n, eng.dtype, eng.device
    want = norms or vectors is not None
    use_store = (gram or keep_store) and Store.nbytes(eng) <= eng.opts.memory_budget
    store = Store.empty(eng) if use_store else None
    gsq = torch.empty(n, dtype=dt, device=dev) if want else None
    dots = torch.empty(n, vectors.k, dtype=dt, device=dev) if vectors is not None else None
    scale = torch.ones(n, dtype=torch.float64, device=dev)
    K = torch.empty(n, n, dtype=dt, device=dev) if gram and store is None else None
    targets = []
    spans = list(eng.blocks())
    for bi, (s, e) in enumerate(spans):
        f = eng.capture(s, e)
        dense = None
        if eng.layout.width:  # straight into the store's rows when there is one (no copy)
            dense = store.dense[s:e] if store is not None else eng.dense(f)
            if store is not None:
                eng.fill(f, dense)
        if want:
            g, d = block_products(eng, f, dense, vectors)
            gsq[s:e] = g
            if d is not None:
                dots[s:e] = d
        scale[s:e] = f.scale
        targets.append(f.targets)
        if store is not None:
            store.put(s, e, f, dense)
        elif K is not None:
            K[s:e, s:e] = unscale_gram_(gram_of(eng, f.A, f.D, dense, f.n), f.scale, f.scale)
            for s2, e2 in spans[bi + 1 :]:
                fj = eng.capture(s2, e2)
                Kij = cross_gram(eng, f, fj)
                if eng.layout.width:
                    Kij += dense @ eng.dense(fj).T
                unscale_gram_(Kij, f.scale, fj.scale)
                K[s:e, s2:e2] = Kij
                K[s2:e2, s:e] = Kij.T
        del f, dense
    if gram and store is not None:
        K = unscale_gram_(gram_of(eng, store.A, store.D, store.dense, n), scale, scale)
    return PassResult(gsq, dots, scale, targets, K, store)
