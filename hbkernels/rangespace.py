"""Every eigenvalue and gradient alignment of a low-rank symmetric operator through its range.

The Hessian of a network on ``n`` training points is often far from full rank: for the paper's
ReLU MLP ``d-h-h-C`` its rank is at most ``nC`` (the Gauss-Newton part, spanned by the rows of
the Jacobian) plus the range of the second-derivative part, whose cross-layer blocks have rank
at most ``Ch + h(d + 1) + ...`` whatever ``n`` is: 700-1,300 of ``p = 10,703`` measured on the
reference Table 1 nets. Then, from block products alone (``H`` is never formed):

1. an orthonormal basis ``Q`` (``p x r``) of the range is found block by block (randomised range
   finder: ``Y = H Omega`` for Gaussian blocks, projected twice against the basis so far, its
   singular directions above ``rtol`` times the first block's size kept; a block that adds
   fewer directions than its width has exhausted the range);
2. a fresh Gaussian block of ``check`` columns measures the residual ``E = (I - Q Q^T) H``:
   ``||E||_2 <= 10 sqrt(2/pi) max_i ||E omega_i||`` with probability at least
   ``1 - 10^-check`` (Halko, Martinsson, Tropp 2011, Lemma 4.1); above ``1e5 rtol`` it is an
   error, never a silent truncation;
3. ``M = Q^T H Q`` (``r x r``) has the nonzero eigenpairs (``eigh``); the other ``p - r``
   eigenvalues are 0 (to within ``residual``). ``M`` comes from the products already made:
   ``Q^T Y = M Q^T Omega`` on the range, solved by least squares over all blocks (the check
   block included, so the ``r x B`` sketch has ``B >= r + check`` columns); for float32
   products, or if that ``M`` is not symmetric to 1e-9, it comes from ``r`` more products;
4. the cosines of the unit training gradients with the range eigenvectors are ``Ghat Q S``.

The null space (eigenvalue 0, multiplicity ``p - r``) has no preferred basis: ``eigh`` of ``H``
returns one fixed by round-off. What is basis-free is how much of each unit gradient lies in it,
``null_alignment[s] = ||(I - Q Q^T) ghat_s||``: no unit vector of the null space -- so no
eigenvector of any basis of it -- has ``|cos(g_s, v)|`` above that. When it is below the
threshold ``eps`` of the measure ``G`` for every ``s``, no null eigenvector counts in ``G``
under either rule, in any basis, and this route's ``G`` is exact; the alignments it returns
for the null columns are 0. Callers must check that (:attr:`RangeSpectrum.null_alignment_max`).

Cost for rank ``r`` (``b`` the block width): about ``r + b + check`` operator columns plus
``eigh`` of ``r x r``; for a Hessian of ``n << p`` samples a block product costs far
less than a dense ``p x p`` GEMM, so this beats assembling ``H`` (``p`` columns) and reducing it
(``O(p^3)``). Memory: ``Q`` (``p r``), ``M``, a ``p x b`` block and the ``(n, p)``
alignments, and every Gaussian block with its product (``2 p B``). :func:`range_spectrum` returns None when the rank exceeds ``max_rank`` (the route
would not pay).
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
        residual: the probabilistic bound on ``||H - Q Q^T H||_2 / ||H||_F`` (module
            docstring, step 2); every null eigenvalue is below ``residual * ||H||_F`` in size.
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


def _range_basis(A, p: int, dtype: torch.dtype, block: int, rtol: float, max_rank: int,
                 gen: torch.Generator):
    """``(Q, scale, Omegas, Ys)``: the basis, the Frobenius norm of ``H`` estimated from the first
    block, and every Gaussian block with its product (for ``Q^T H Q`` without more products)."""
    Q = torch.empty(p, 0, dtype=dtype)
    scale = None
    omegas, ys = [], []
    while Q.shape[1] < p:
        b = min(block, p - Q.shape[1])
        Om = torch.randn(p, b, generator=gen, dtype=dtype)
        Y0 = _apply(A, Om)
        omegas.append(Om)
        ys.append(Y0)
        if scale is None:
            scale = float(Y0.norm()) / math.sqrt(b)  # E||H omega||^2 = ||H||_F^2
        Y = Y0.clone()
        for _ in range(2):  # twice is enough
            Y -= Q @ (Q.T @ Y)
        U, S, _ = torch.linalg.svd(Y, full_matrices=False)
        # a Gaussian block of width b has singular values about sqrt(b) ||E||_F of the residual E
        new = int((S > rtol * scale * math.sqrt(b)).sum())
        if new:
            Q = torch.cat([Q, U[:, :new]], dim=1)
        if Q.shape[1] > max_rank:
            return None
        if new < b:
            break
    return Q, scale or 0.0, omegas, ys


def _projected_matrix(A, Q: torch.Tensor, omegas: list, ys: list) -> torch.Tensor:
    """``M = Q^T H Q`` from the sketch: ``H = Q M Q^T`` on the range gives ``Q^T Y = M Q^T Omega``,
    solved by least squares (``Q^T Omega``, ``r x B`` with ``B >= r + check``, is a well-conditioned
    Gaussian sketch) for float64 products; for float32 ones, or if the solution is not
    symmetric to 1e-9 (a poorly conditioned sketch), ``M`` comes from ``r`` more products."""
    if Q.dtype == torch.float64:
        Om, Y = torch.cat(omegas, dim=1), torch.cat(ys, dim=1)
        M = torch.linalg.lstsq((Q.T @ Om).T, (Q.T @ Y).T).solution.T
        if float((M - M.T).norm()) <= 1e-9 * max(float(M.norm()), 1e-300):
            return (M + M.T) / 2
    # float32 products (the sketch's conditioning would cost too many digits) or a poor sketch
    M = Q.T.double() @ _apply(A, Q).double()
    return (M + M.T) / 2


def _apply(A, V: torch.Tensor) -> torch.Tensor:
    out = A @ V
    return out.to(V.dtype)


def range_spectrum(A, G: torch.Tensor, *, top_vectors: int = 0, block: int = 256,
                   rtol: float | None = None, max_rank: int | None = None, seed: int = 0,
                   check: int = 32) -> RangeSpectrum | None:
    """Eigenvalues of a symmetric ``A`` and the cosines of the rows of ``G`` with its eigenvectors.

    Args:
        A: ``(p, p)`` symmetric: a dense float32/float64 tensor or a
            :class:`~hbkernels.operators.LinearOperator` (block products ``A @ V``), on the CPU.
        G: ``(n, p)`` gradients (any scale; zero rows allowed).
        top_vectors: how many top eigenvectors to return.
        block: columns per range-finder block.
        rtol: relative size below which a direction is round-off (default ``1e3`` times the
            machine epsilon of the dtype).
        max_rank: give up (return None) above this rank (default ``p // 3``).
        seed: seed of the Gaussian blocks.
        check: columns of the residual check (failure probability ``10^-check``).

    Returns:
        :class:`RangeSpectrum`, or None when the rank exceeds ``max_rank``.

    Raises:
        ValueError: ``A`` not square/symmetric/finite, shapes disagree, or the residual check
            shows the range was not captured (never a silent truncation).
    """
    from .operators import LinearOperator

    if isinstance(A, LinearOperator):
        p, dtype = A.dim, A.dtype
        if A.device.type != "cpu":
            fail(_FN, "an operator on the CPU", A.device, raw=True)
    else:
        check_tensor(_FN, "A", A, dims=(2,), floating=True)
        p, dtype = A.shape[0], A.dtype
        if A.shape[1] != p:
            fail(_FN, "a square A", tuple(A.shape))
        if not bool(torch.isfinite(A).all()):
            fail(_FN, "a finite A", "NaN/inf entries", raw=True)
        asym = float((A - A.T).abs().max()) if p else 0.0
        if asym > 1e3 * torch.finfo(dtype).eps * max(float(A.abs().max()), 1e-300):
            fail(_FN, "a symmetric A", f"max |A - A^T| = {asym:.3g}", raw=True)
    check_tensor(_FN, "G", G, dims=(2,), floating=True)
    if G.shape[1] != p:
        fail(_FN, f"G of shape (n, {p})", tuple(G.shape))
    G = G.cpu()
    top_vectors = check_int(_FN, "top_vectors", top_vectors, 0, p)
    block = check_int(_FN, "block", block, 1)
    check = check_int(_FN, "check", check, 1)
    rtol = 1e3 * torch.finfo(dtype).eps if rtol is None else check_float(_FN, "rtol", rtol, 0,
                                                                          lo_open=True)
    max_rank = p // 3 if max_rank is None else check_int(_FN, "max_rank", max_rank, 0)
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)
    found = _range_basis(A, p, dtype, block, rtol, max_rank, gen) if p else (
        torch.empty(0, 0, dtype=dtype), 0.0)
    if found is None:
        return None
    Q, scale, omegas, ys = found
    r = Q.shape[1]
    secs["range"] = time.perf_counter() - t0
    residual = 0.0
    if p and scale > 0:
        Om = torch.randn(p, check, generator=gen, dtype=dtype)
        Z = _apply(A, Om)
        omegas.append(Om)
        ys.append(Z.clone())
        for _ in range(2):
            Z -= Q @ (Q.T @ Z)
        residual = 10 * math.sqrt(2 / math.pi) * float(Z.norm(dim=0).max()) / scale
    if residual > 1e5 * rtol:
        fail(_FN, f"the range basis to capture A (residual <= {1e5 * rtol:.1e})",
             f"residual {residual:.3g} at rank {r}", raw=True)
    secs["check"] = time.perf_counter() - t0 - secs["range"]
    M = _projected_matrix(A, Q, omegas, ys) if r else Q.new_zeros(0, 0, dtype=torch.float64)
    del omegas, ys
    w, S = torch.linalg.eigh(M)  # ascending
    del M
    Q64 = Q.double()
    Ghat = _unit_rows(G)
    U = Ghat @ Q64  # (n, r): components in the range
    null = (Ghat - U @ Q64.T).norm(dim=1)
    # descending order of all p eigenvalues: positives, the p - r zeros, negatives
    w_desc, S_desc = w.flip(0), S.flip(1)
    pos = int((w_desc > 0).sum())
    eigenvalues = torch.cat([w_desc[:pos], w.new_zeros(p - r), w_desc[pos:]])
    C_range = U @ S_desc  # (n, r)
    n = G.shape[0]
    alignments = torch.cat([C_range[:, :pos], C_range.new_zeros(n, p - r), C_range[:, pos:]], dim=1)
    vectors = None
    if top_vectors:
        cols = [Q64 @ S_desc[:, : min(top_vectors, pos)]]
        short = top_vectors - cols[0].shape[1]
        if short:  # null-space vectors (eigenvalue 0) orthogonal to the range, then negatives
            Z = torch.randn(p, min(short, p - r), generator=gen, dtype=torch.float64)
            for _ in range(2):
                Z -= Q64 @ (Q64.T @ Z)
            cols.append(torch.linalg.qr(Z).Q)
            rest = short - cols[-1].shape[1]
            if rest:
                cols.append(Q64 @ S_desc[:, pos : pos + rest])
        vectors = torch.cat(cols, dim=1).to(dtype)
    secs["eigh_gemm"] = time.perf_counter() - t0 - secs["range"] - secs["check"]
    secs["total"] = time.perf_counter() - t0
    return RangeSpectrum(eigenvalues=eigenvalues, rank=r, residual=residual, null_alignment=null,
                         alignments=alignments, vectors=vectors, seconds=secs)
