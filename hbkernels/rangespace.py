"""Every eigenvalue and gradient alignment of a low-rank symmetric matrix through its range.

The Hessian of a network on ``n`` training points is often far from full rank: for the paper's
ReLU MLP ``d-h-h-C`` its rank is at most ``nC`` (the Gauss-Newton part, spanned by the rows of
the Jacobian) plus the range of the second-derivative part, whose cross-layer blocks have rank
at most ``Ch + h(d + 1) + ...`` whatever ``n`` is: about 1,700 of ``p = 10,703``. Then

1. an orthonormal basis ``Q`` (``p x r``) of the range is found block by block (randomised range
   finder: ``Y = H Omega`` for Gaussian blocks, projected twice against the basis so far, its
   singular directions above ``rtol ||H||_F`` kept; a block that adds fewer directions than its
   width has exhausted the range);
2. the residual ``||H - Q Q^T H||_F`` is computed explicitly (column chunks), so the claim
   "``H = Q M Q^T`` to within ``residual``" is checked, not assumed;
3. ``M = Q^T H Q`` (``r x r``) has the nonzero eigenpairs (``eigh``); the other ``p - r``
   eigenvalues are 0 (to within ``residual``);
4. the cosines of the unit training gradients with the range eigenvectors are ``Ghat Q S``.

The null space (eigenvalue 0, multiplicity ``p - r``) has no preferred basis: ``eigh`` of ``H``
returns one fixed by round-off. What is basis-free is how much of each unit gradient lies in it,
``null_alignment[s] = ||(I - Q Q^T) ghat_s||``: no unit vector of the null space -- so no
eigenvector of any basis of it -- has ``|cos(g_s, v)|`` above that. When it is below the
threshold ``eps`` of the measure ``G`` for every ``s``, no null eigenvector counts in ``G``
under either rule, in any basis, and this route's ``G`` is exact; the alignments it returns
for the null columns are 0. Callers must check that (:attr:`RangeSpectrum.null_alignment_max`).

Cost for rank ``r`` (``b`` the block width): about ``3 p^2 r`` flops of GEMMs (the blocks, ``H Q``
and the residual) plus ``eigh`` of ``r x r``, against ``O(p^3)`` for ``sytrd`` / ``eigh`` of
``H``. Memory: ``H`` (the caller's), ``Q`` and ``H Q`` (``2 p r``), ``M``, a ``p x b`` block and
the ``(n, p)`` alignments. :func:`range_spectrum` returns None when the rank exceeds
``max_rank`` (the route would not pay).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .checks import check_float, check_int, check_tensor, fail
from .results import Result

__all__ = ["RangeSpectrum", "range_spectrum"]

_FN = "hbk.range_spectrum"


@dataclass
class RangeSpectrum(Result):
    """All eigenvalues of a symmetric ``H`` of rank ``r`` and the gradient alignments.

    Attributes:
        eigenvalues: ``(p,)`` float64 descending: the ``r`` eigenvalues of ``Q^T H Q`` and
            ``p - r`` zeros in their sorted place.
        rank: ``r``, the dimension of the range basis.
        residual: ``||H - Q Q^T H||_F / ||H||_F`` (explicit); every null eigenvalue is below
            ``residual * ||H||_F`` in size.
        null_alignment: ``(n,)`` float64, ``||(I - Q Q^T) ghat_s||``: the largest ``|cos|`` of
            gradient ``s`` with any unit vector of the null space (0 for a zero gradient).
        alignments: ``(n, p)`` float64 signed cosines with every eigenvector (columns in the
            order of ``eigenvalues``; null columns 0, see the module docstring).
        vectors: ``(p, k)`` the top-``k`` unit eigenvectors, or None.
        seconds: wall time per stage.
    """

    eigenvalues: torch.Tensor
    rank: int
    residual: float
    null_alignment: torch.Tensor
    alignments: torch.Tensor = field(repr=False)
    vectors: torch.Tensor | None = field(default=None, repr=False)
    seconds: dict = field(default_factory=dict)

    @property
    def null_alignment_max(self) -> float:
        """``max_s null_alignment[s]`` (0 for no gradients)."""
        return float(self.null_alignment.max()) if self.null_alignment.numel() else 0.0


def _unit_rows(G: torch.Tensor) -> torch.Tensor:
    """Rows of ``G`` scaled to unit norm (zero rows stay zero), in float64."""
    G = G.double()
    scale = G.abs().amax(dim=1, keepdim=True)  # against under/overflow of the norm
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Gs = G / scale
    norms = Gs.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, Gs / torch.where(norms > 0, norms, torch.ones_like(norms)), Gs)


def _range_basis(H: torch.Tensor, block: int, rtol: float, max_rank: int, seed: int
                 ) -> torch.Tensor | None:
    p = H.shape[0]
    gen = torch.Generator().manual_seed(seed)
    normH = float(torch.linalg.matrix_norm(H))
    Q = H.new_empty(p, 0)
    while Q.shape[1] < p:
        b = min(block, p - Q.shape[1])
        Y = H @ torch.randn(p, b, generator=gen, dtype=H.dtype)
        for _ in range(2):  # twice is enough
            Y -= Q @ (Q.T @ Y)
        U, S, _ = torch.linalg.svd(Y, full_matrices=False)
        # a Gaussian block of width b has singular values about sqrt(b) ||E||_F of the residual E
        new = int((S > rtol * normH * math.sqrt(b)).sum())
        if new:
            Q = torch.cat([Q, U[:, :new]], dim=1)
        if Q.shape[1] > max_rank:
            return None
        if new < b:
            return Q
    return Q


def range_spectrum(H: torch.Tensor, G: torch.Tensor, *, top_vectors: int = 0, block: int = 256,
                   rtol: float | None = None, max_rank: int | None = None, seed: int = 0,
                   chunk: int = 1024) -> RangeSpectrum | None:
    """Eigenvalues of ``H`` and the cosines of the rows of ``G`` with its eigenvectors.

    Args:
        H: ``(p, p)`` symmetric, float32 or float64, CPU or CUDA (not modified).
        G: ``(n, p)`` gradients (any scale; zero rows allowed), same device.
        top_vectors: how many top eigenvectors to return.
        block: columns per range-finder block.
        rtol: relative size below which a direction is round-off (default ``1e3`` times the
            machine epsilon of ``H``'s dtype).
        max_rank: give up (return None) above this rank (default ``p // 3``).
        seed: seed of the Gaussian blocks.
        chunk: columns per chunk of the explicit residual.

    Returns:
        :class:`RangeSpectrum`, or None when the rank exceeds ``max_rank``.

    Raises:
        ValueError: ``H`` not square/symmetric/finite, shapes disagree, or the explicit
            residual shows the range was not captured (it should not happen; never silent).
    """
    check_tensor(_FN, "H", H, dims=(2,), floating=True)
    p = H.shape[0]
    if H.shape[1] != p:
        fail(_FN, "a square H", tuple(H.shape))
    check_tensor(_FN, "G", G, dims=(2,), floating=True)
    if G.shape[1] != p or G.device != H.device:
        fail(_FN, f"G of shape (n, {p}) on {H.device}", f"{tuple(G.shape)} on {G.device}")
    if not bool(torch.isfinite(H).all()):
        fail(_FN, "a finite H", "NaN/inf entries")
    asym = float((H - H.T).abs().max()) if p else 0.0
    if asym > 1e3 * torch.finfo(H.dtype).eps * max(float(H.abs().max()), 1e-300):
        fail(_FN, "a symmetric H", f"max |H - H^T| = {asym:.3g}")
    top_vectors = check_int(_FN, "top_vectors", top_vectors, 0, p)
    block = check_int(_FN, "block", block, 1)
    rtol = 1e3 * torch.finfo(H.dtype).eps if rtol is None else check_float(_FN, "rtol", rtol, 0,
                                                                            lo_open=True)
    max_rank = p // 3 if max_rank is None else check_int(_FN, "max_rank", max_rank, 0)
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    Q = _range_basis(H, block, rtol, max_rank, seed) if p else H.new_empty(0, 0)
    if Q is None:
        return None
    r = Q.shape[1]
    secs["range"] = time.perf_counter() - t0
    HQ = H @ Q
    normH = float(torch.linalg.matrix_norm(H))
    res2 = 0.0
    for c0 in range(0, p, chunk):  # ||H - Q (H Q)^T||_F, explicitly
        c1 = min(p, c0 + chunk)
        res2 += float((H[:, c0:c1] - Q @ HQ[c0:c1].T).square().sum())
    residual = math.sqrt(res2) / normH if normH > 0 else 0.0
    if residual > 1e5 * rtol:
        fail(_FN, f"the range basis to capture H (residual <= {1e5 * rtol:.1e})",
             f"residual {residual:.3g} at rank {r}", raw=True)
    secs["residual"] = time.perf_counter() - t0 - secs["range"]
    M = Q.T @ HQ
    M = (M + M.T) / 2
    w, S = torch.linalg.eigh(M.double())  # ascending
    del HQ, M
    U = _unit_rows(G) @ Q.double()  # (n, r): components in the range
    null = (_unit_rows(G) - U @ Q.double().T).norm(dim=1)
    # descending order of all p eigenvalues: positives, the p - r zeros, negatives
    w_desc, S_desc = w.flip(0), S.flip(1)
    pos = int((w_desc > 0).sum())
    zeros = w.new_zeros(p - r)
    eigenvalues = torch.cat([w_desc[:pos], zeros, w_desc[pos:]])
    C_range = U @ S_desc  # (n, r)
    n = G.shape[0]
    alignments = torch.cat([C_range[:, :pos], C_range.new_zeros(n, p - r), C_range[:, pos:]], dim=1)
    vectors = None
    if top_vectors:
        cols = [Q.double() @ S_desc[:, : min(top_vectors, pos)]]
        short = top_vectors - cols[0].shape[1]
        if short:  # a null-space vector (eigenvalue 0) orthogonal to the range, then negatives
            gen = torch.Generator().manual_seed(seed + 1)
            Z = torch.randn(p, min(short, p - r), generator=gen, dtype=torch.float64)
            for _ in range(2):
                Z -= Q.double() @ (Q.double().T @ Z)
            cols.append(torch.linalg.qr(Z).Q)
            rest = short - cols[-1].shape[1]
            if rest:
                cols.append(Q.double() @ S_desc[:, pos : pos + rest])
        vectors = torch.cat(cols, dim=1).to(H.dtype)
    secs["eigh_gemm"] = time.perf_counter() - t0 - secs["range"] - secs["residual"]
    secs["total"] = time.perf_counter() - t0
    return RangeSpectrum(eigenvalues=eigenvalues, rank=r, residual=residual, null_alignment=null,
                         alignments=alignments, vectors=vectors, seconds=secs)
