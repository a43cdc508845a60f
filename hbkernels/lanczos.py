"""Top-k eigenpairs of a symmetric operator by thick-restart Lanczos (C++ driver).

The control flow (basis, Gram-Schmidt, restarts, locking) runs in C++ (``csrc/lanczos.cpp``)
on tensors on the vectors' device; this module validates the arguments, builds the start
block, shows the progress bar and packs the result.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._loader import load_extension
from .results import Result

_C = load_extension()

__all__ = ["LanczosResult", "lanczos"]

_WHICH = ("LA", "SA", "LM")
_FLOATS = (torch.float32, torch.float64)


@dataclass
class LanczosResult(Result):
    """Eigenpairs from :func:`lanczos` and how they were obtained.

    Attributes:
        eigenvalues: ``(k,)`` float64 (CPU), descending for "LA", by descending magnitude for
            "LM", ascending for "SA".
        eigenvectors: ``(dim, k)`` orthonormal columns, basis dtype and device.
        residuals: ``(k,)`` float64, ``|A y_i - theta_i y_i|`` recomputed from the operator's
            products (not the Lanczos estimate).
        converged: ``(k,)`` bool; True when both the Lanczos estimate and the recomputed
            residual are at most ``tol * max(|theta_i|, |theta_1|)``.
        num_matvecs: single-vector products (a block call of ``b`` vectors counts ``b``).
        num_restarts: thick restarts.
        reorth_passes: Gram-Schmidt passes against the basis (one or two per matvec call).
        matvec_seconds: wall time inside ``matvec``.
        total_seconds: wall time of the whole call.
        which, tol, ncv, block_size: the settings used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_restarts: int
    reorth_passes: int
    matvec_seconds: float
    total_seconds: float
    which: str = "LA"
    tol: float = 1e-6
    ncv: int = 0
    block_size: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """Whether every requested pair converged."""
        return bool(self.converged.all())

    @property
    def overhead_fraction(self) -> float:
        """Fraction of the wall time spent outside ``matvec``."""
        if self.total_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.matvec_seconds / self.total_seconds)

    def to_dict(self, include_vectors: bool = True) -> dict:
        """JSON-compatible dict (eigenvectors as a ``dim x k`` nested list if asked)."""
        d = super().to_dict()
        d.update(d.pop("extra"))
        if not include_vectors:
            d.pop("eigenvectors")
        return d

    def save(self, path: str | Path, include_vectors: bool = True) -> Path:
        """Save to ``path`` (JSON) and ``path.with_suffix('.pt')`` (the tensors); load it back
        with :meth:`LanczosResult.load`. ``include_vectors=False`` leaves the eigenvectors out
        (they are then an empty ``(dim, 0)`` tensor after loading)."""
        if include_vectors:
            return super().save(path)
        return dataclasses.replace(self, eigenvectors=self.eigenvectors[:, :0]).save(path)


def default_ncv(dim: int, k: int, block_size: int = 1) -> int:
    """Default basis size: ARPACK's ``max(2k + 1, 20)``, at least ``k + 2 b``, at most dim."""
    return min(dim, max(2 * k + 1, 20, k + 2 * block_size))


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"hbk.lanczos: expected {name} to be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"hbk.lanczos: expected {name} {rng}, got {value}")
    return value


def _start_block(dim: int, b: int, v0: torch.Tensor | None, seed: int | None,
                 dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """The (dim, b) start block and the seed of the driver's own random vectors."""
    gen = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    gen.manual_seed(seed)
    start = torch.randn(dim, b, generator=gen, dtype=torch.float64)
    if v0 is not None:
        if not isinstance(v0, torch.Tensor):
            raise TypeError(f"hbk.lanczos: expected v0 to be a torch.Tensor, got {type(v0).__name__}")
        if not v0.is_floating_point():
            raise TypeError(f"hbk.lanczos: expected a floating-point v0, got {v0.dtype}")
        v = v0.detach().to("cpu", torch.float64)
        if v.dim() == 1:
            v = v[:, None]
        if v.dim() != 2 or v.shape[0] != dim or v.shape[1] > b:
            raise ValueError(
                f"hbk.lanczos: expected v0 of shape ({dim},) or ({dim}, c) with c <= block_size = {b}, "
                f"got {tuple(v0.shape)}"
            )
        if not torch.isfinite(v).all() or v.norm() == 0:
            raise ValueError("hbk.lanczos: expected a nonzero, finite v0, got zero or non-finite values")
        start[:, : v.shape[1]] = v
    return start.to(device=device, dtype=dtype), seed


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    which: str = "LA",
    tol: float = 1e-6,
    ncv: int | None = None,
    max_matvecs: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    block_size: int = 1,
    quiet: bool = True,
    store_products: bool = True,
    reorth: str = "selective",
) -> LanczosResult:
    """k extreme eigenpairs of a symmetric linear operator (thick-restart Lanczos).

    Thick-restart Lanczos (Wu & Simon) with full reorthogonalisation (two classical
    Gram-Schmidt passes against the whole basis, as GEMVs/GEMMs on the vectors' device),
    locking of converged pairs, convergence test ``|beta_m s_mi| <= tol * max(|theta_i|,
    |theta_1|)`` (theta_1: the most wanted Ritz value) and the projected problem in float64.

    Args:
        matvec: ``A``: takes ``(dim,)`` (``block_size == 1``) or ``(dim, b)`` and returns the
            same shape. Its argument is a view of the Lanczos basis: read it, never modify it
            in place or keep it. Exceptions it raises reach the caller unchanged.
        dim: order of ``A``.
        k: number of eigenpairs, ``1 <= k <= dim``.
        which: "LA" (largest algebraic), "SA" (smallest algebraic), "LM" (largest magnitude).
        tol: relative residual tolerance.
        ncv: basis size (default :func:`default_ncv`: ``max(2k + 1, 20)``, at most dim).
        max_matvecs: budget of single-vector products (default ``max(1000, 50 * ncv)``).
        v0: ``(dim,)`` or ``(dim, c)`` start vector(s), ``c <= block_size``; random otherwise.
        seed: seed of the random start (and of the driver's random vectors); ``None`` draws
            one from torch's global generator.
        dtype: basis dtype, float32 or float64.
        device: basis device (default: v0's device, else CPU).
        block_size: vectors per ``matvec`` call; > 1 runs block Lanczos with ``(dim, b)``
            blocks.
        quiet: no progress bar when True.
        store_products: keep ``A V`` (twice the basis memory) so that the final residuals need
            no extra ``matvec`` calls; when False they cost ``k`` products (counted).
        reorth: "twice": two classical Gram-Schmidt passes against the whole basis for every
            new vector; "selective" (default): the second pass only when the first cancels,
            ``|w'| < eta |w|`` (Daniel-Gragg-Kaufman-Stewart criterion, eta = 1e-3 for a
            float64 basis, 1/sqrt(2) for float32), which keeps the basis orthogonal to about
            ``eps / eta`` at half the memory traffic.

    Note:
        One start vector reaches a single direction of each eigenspace, so an exactly
        repeated eigenvalue may be found fewer times than its multiplicity (as with ARPACK);
        use ``block_size`` >= the multiplicity when repeats are expected.

    Returns:
        :class:`LanczosResult`. Pairs not converged within ``max_matvecs`` are returned with
        ``converged`` False, and a ``RuntimeWarning`` says so.

    Raises:
        TypeError: ``matvec`` not callable, bad dtype, or a ``matvec`` result that is not a
            tensor.
        ValueError: bad sizes or settings, or a ``matvec`` result of the wrong shape.
    """
    t0 = time.perf_counter()
    fn = "hbk.lanczos"
    if not callable(matvec):
        raise TypeError(f"{fn}: expected matvec to be callable, got {type(matvec).__name__}")
    dim = _check_int("dim", dim, 1)
    k = _check_int("k", k, 1, dim)
    if which not in _WHICH:
        raise ValueError(f"{fn}: expected which to be one of {_WHICH}, got {which!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"{fn}: expected tol > 0, got {tol!r}")
    if dtype not in _FLOATS:
        raise TypeError(f"{fn}: expected dtype float32 or float64, got {dtype}")
    block_size = _check_int("block_size", block_size, 1, dim)
    if ncv is None:
        ncv = default_ncv(dim, k, block_size)
    else:
        ncv = _check_int("ncv", ncv, 1, dim)
        if ncv != dim and ncv < k + block_size:
            raise ValueError(
                f"{fn}: expected k + block_size <= ncv <= dim (or ncv = dim), got ncv = {ncv} "
                f"(k = {k}, block_size = {block_size}, dim = {dim})"
            )
    if reorth not in ("selective", "twice"):
        raise ValueError(f"{fn}: expected reorth to be 'selective' or 'twice', got {reorth!r}")
    if max_matvecs is None:
        max_matvecs = max(1000, 50 * ncv)
    max_matvecs = _check_int("max_matvecs", max_matvecs, block_size)
    if device is None:
        device = v0.device if isinstance(v0, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    start, seed = _start_block(dim, block_size, v0, seed, dtype, device)

    bar = None
    progress = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_matvecs, desc=fn, unit="mv", leave=False)

        def progress(num_matvecs: int, num_converged: int, num_restarts: int) -> None:
            bar.update(num_matvecs - bar.n)
            bar.set_postfix_str(f"locked {num_converged}/{k}, restarts {num_restarts}", refresh=False)

    try:
        out = _C.lanczos(matvec, start, k, which, float(tol), ncv, max_matvecs, block_size,
                         bool(store_products), reorth == "twice", seed & (2**64 - 1), progress)
    finally:
        if bar is not None:
            bar.close()
    res = LanczosResult(
        eigenvalues=out["eigenvalues"],
        eigenvectors=out["eigenvectors"],
        residuals=out["residuals"],
        converged=out["converged"],
        num_matvecs=int(out["num_matvecs"]),
        num_restarts=int(out["num_restarts"]),
        reorth_passes=int(out["reorth_passes"]),
        matvec_seconds=float(out["matvec_seconds"]),
        total_seconds=time.perf_counter() - t0,
        which=which,
        tol=float(tol),
        ncv=ncv,
        block_size=block_size,
    )
    nconv = int(res.converged.sum())
    if nconv < k:
        warnings.warn(
            f"{fn}: only {nconv} of {k} eigenpairs converged to tol={tol:g} "
            f"({res.num_matvecs} matvecs, max_matvecs={max_matvecs}); the others are returned "
            "with converged=False",
            RuntimeWarning,
            stacklevel=2,
        )
    return res
