"""Stochastic estimators on any symmetric operator: trace (Hutchinson, Hutch++) and the
spectral density by stochastic Lanczos quadrature (SLQ).

Every estimator takes an operator on the :class:`~hbkernels.operators.LinearOperator` base
(``HessianOperator``, ``GGNOperator``, ``MatrixOperator``, ...), a square tensor, or any object
with ``dim`` and a block ``matvec`` (wrapped by :func:`~hbkernels.operators.as_operator`, so
its products are checked for shape, dtype and finiteness like every other operator's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._loader import load_extension
from .checks import check_choice, check_float, check_int, check_seed, fail
from .operators import LinearOperator, as_operator
from .results import Result

_C = load_extension()

__all__ = ["SpectralDensity", "TraceResult", "hessian_trace", "spectral_density"]


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
    return gen


def _rademacher(op: LinearOperator, m: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, (op.dim, m), generator=gen, dtype=torch.int8)
    return (z.to(op.dtype) * 2 - 1).to(op.device)


def _blocked(op: LinearOperator, V: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.cat([op.matvec(V[:, i:i + block_size]) for i in range(0, V.shape[1], block_size)], 1)


# ------------------------------------------------------------------------------ trace
@dataclass
class TraceResult(Result):
    """Stochastic trace estimate.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of the stochastic part (Hutchinson: of the whole estimate;
            Hutch++: of the residual Hutchinson term; the low-rank part is deterministic).
        num_matvecs: operator products used.
        method: "hutchinson" or "hutch++".
        num_probes: probe vectors requested.
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    num_probes: int


def hessian_trace(op: Any, num_probes: int = 99, method: str = "hutch++", seed: int | None = None,
                  block_size: int = 33) -> TraceResult:
    """Stochastic estimate of ``tr(A)`` with Rademacher probes, in blocks.

    Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a third of the products builds a sketch
    ``Q = orth(A S)`` whose trace ``tr(Q^T A Q)`` is exact, the last third estimates the trace
    of the deflated rest by Hutchinson; its error falls as 1/m instead of 1/sqrt(m).

    Args:
        op: an operator (see the module docstring) or a square tensor.
        num_probes: products to spend (Hutch++: ``s = num_probes // 3`` sketch vectors,
            ``s`` deflation products and ``num_probes - 2 s`` Hutchinson probes).
        method: "hutch++" or "hutchinson".
        seed: probe seed (None: drawn from torch's global generator).
        block_size: vectors per operator call.

    Returns:
        :class:`TraceResult`.
    """
    fn = "hbk.hessian_trace"
    op = as_operator(fn, op)
    check_choice(fn, "method", method, ("hutch++", "hutchinson"))
    check_int(fn, "num_probes", num_probes, 3 if method == "hutch++" else 1)
    check_int(fn, "block_size", block_size, 1)
    gen = _generator(check_seed(fn, "seed", seed))
    if method == "hutchinson":
        Z = _rademacher(op, num_probes, gen)
        vals = (Z * _blocked(op, Z, block_size)).sum(0).double()
        se = float(vals.std() / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
        return TraceResult(float(vals.mean()), se, num_probes, method, num_probes)
    s = min(num_probes // 3, op.dim)
    g = num_probes - 2 * s
    Q, _ = torch.linalg.qr(_blocked(op, _rademacher(op, s, gen), block_size).double())
    Q = Q.to(op.dtype)
    t_low = float(torch.sum(Q * _blocked(op, Q, block_size)).double())
    G = _rademacher(op, g, gen)
    G = G - Q @ (Q.t() @ G)
    vals = (G * _blocked(op, G, block_size)).sum(0).double()
    se = float(vals.std() / math.sqrt(g)) if g > 1 else float("nan")
    return TraceResult(t_low + float(vals.mean()), se, 2 * s + g, method, num_probes)


# ------------------------------------------------------------------------------ density
@dataclass
class SpectralDensity(Result):
    """Eigenvalue density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``(g,)`` points.
        density: ``(g,)`` Gaussian-broadened density (integrates to about 1 over a grid that
            covers the spectrum).
        nodes: ``(num_probes, m)`` Ritz values (quadrature nodes) per probe.
        weights: ``(num_probes, m)`` quadrature weights per probe (each row sums to 1).
        sigma: Gaussian width.
        num_matvecs: operator products used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    num_matvecs: int


def default_width(lo: float, hi: float) -> float:
    """1 % of the Ritz-value range, but at least 1e-4 of the spectrum's magnitude (a spectrum
    that is one point up to rounding, such as ``3 * I``, would otherwise get a width below the
    float64 spacing of its grid and a density that integrates to 0), and 1e-3 for ``0``."""
    scale = max(abs(lo), abs(hi))
    return max(0.01 * (hi - lo), 1e-4 * scale) if scale > 0 else 1e-3


def spectral_density(op: Any, num_probes: int = 10, lanczos_steps: int = 80,
                     grid: torch.Tensor | int | None = None, sigma: float | None = None,
                     seed: int | None = None, block_size: int | None = None,
                     quiet: bool = True) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe z, ``m`` Lanczos steps (C++ driver, full reorthogonalisation,
    all probes of a block advanced by one block product per step) give a tridiagonal ``T``
    with eigenpairs ``(theta_j, u_j)``; ``z^T f(A) z / |z|^2 ~ sum_j u_j[0]^2 f(theta_j)``.
    The density is ``(1 / num_probes) sum_probes sum_j u_j[0]^2 N(t; theta_j, sigma^2)``.

    Args:
        op: an operator (see the module docstring) or a square tensor.
        num_probes: number of probes.
        lanczos_steps: Lanczos steps per probe (at most dim).
        grid: ``(g,)`` tensor of points, or a number of points (default 1000) spread over the
            Ritz values +- 5 sigma.
        sigma: Gaussian width (default: :func:`default_width` of the Ritz values).
        seed: probe seed.
        block_size: probes per operator call (default: all).
        quiet: no progress bar when True.

    Returns:
        :class:`SpectralDensity`.
    """
    fn = "hbk.spectral_density"
    op = as_operator(fn, op)
    check_int(fn, "num_probes", num_probes, 1)
    check_int(fn, "lanczos_steps", lanczos_steps, 1)
    if lanczos_steps > op.dim:
        fail(fn, f"lanczos_steps <= dim = {op.dim}", lanczos_steps)
    if sigma is not None:
        check_float(fn, "sigma", sigma, 0.0, lo_open=True)
    block_size = num_probes if block_size is None else check_int(fn, "block_size", block_size, 1)
    gen = _generator(check_seed(fn, "seed", seed))
    if grid is not None and not isinstance(grid, torch.Tensor):
        check_int(fn, "grid (a number of points)", grid, 2)
    elif isinstance(grid, torch.Tensor) and (grid.dim() != 1 or not grid.is_floating_point()):
        fail(fn, "grid to be a 1-D floating tensor or a number of points", grid)
    Z = _rademacher(op, num_probes, gen)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_probes * lanczos_steps, desc=fn, unit="mv", leave=False)
    done = [0]

    def progress(n: int, _c: int, _r: int) -> None:
        if bar is not None:
            bar.update(done[0] + n - bar.n)

    alphas, betas = [], []
    try:
        for c0 in range(0, num_probes, block_size):
            block = Z[:, c0:c0 + block_size]
            a, b = _C.lanczos_tridiagonal(op.matvec, block, lanczos_steps, progress)
            done[0] += block.shape[1] * lanczos_steps
            alphas.append(a)
            betas.append(b)
    finally:
        if bar is not None:
            bar.close()
    alpha, beta = torch.cat(alphas), torch.cat(betas)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, U = torch.linalg.eigh(T)
    w = U[:, 0, :] ** 2
    lo, hi = float(theta.min()), float(theta.max())
    sigma = default_width(lo, hi) if sigma is None else float(sigma)
    if isinstance(grid, torch.Tensor):
        grid_t = grid.detach().to("cpu", torch.float64)
    else:
        grid_t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000 if grid is None else grid,
                                dtype=torch.float64)
    diff = grid_t[:, None, None] - theta[None]  # (g, probes, m)
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * w[None]).sum((1, 2)) / num_probes
    return SpectralDensity(grid_t, density, theta, w, float(sigma), num_probes * lanczos_steps)
