"""Top-k eigenpairs of a symmetric operator by thick-restart Lanczos (C++ driver).

The control flow (basis, Gram-Schmidt, restarts, locking) runs in C++ (``csrc/lanczos.cpp``)
on tensors on the vectors' device; this module validates the arguments, builds the start
block, shows the progress bar and packs the result.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._loader import load_extension
from .checks import check_bool, check_choice, check_float, check_int, check_seed, check_tensor, fail
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
        reorth_passes: full Gram-Schmidt passes against the basis (one or two per matvec call).
        matvec_seconds: wall time inside ``matvec``.
        total_seconds: wall time of the whole call.
        which, tol, ncv, block_size: the settings used.
        verify_status: the check for missed (e.g. repeated) eigenvalues after convergence:
            "checked" (a probe from a fresh random vector orthogonal to the converged ones
            found nothing more wanted than the k-th value), "complete" (the basis spans the
            whole space), "off" (``verify=False``), "no_room" (``ncv`` too small for a probe),
            "no_budget" (``max_matvecs`` reached during the check) or "not_converged".
        num_probes: probes run; probe_found: those that found a missed pair.
        main_matvecs: products until the k pairs first converged (the rest is the check).
        profile: seconds outside ``matvec`` by part of the driver: "orth_seconds"
            (Gram-Schmidt and copies after each call), "solve_seconds" (projected
            eigensolves), "restart_seconds" (restarts and probe starts), "finish_seconds"
            (Ritz vectors and residuals), "python_seconds" (argument checks, start block and
            result, outside the C++ driver); with ``block_size="auto"`` also "block_rule"
            ("cpu" or "timed") and, when timed, the trial's times and product count.
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
    verify_status: str = "off"
    num_probes: int = 0
    probe_found: int = 0
    main_matvecs: int = 0
    profile: dict = field(default_factory=dict)
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


AUTO_BLOCK = 4  # block size tried by block_size="auto"
AUTO_BLOCK_GAIN = 0.7  # a block is chosen when its per-vector time is below this x a single's


def choose_block_size(t_single: float, t_block: float, b: int = AUTO_BLOCK) -> int:
    """``b`` when one product of ``b`` vectors (``t_block`` s) costs less than
    ``AUTO_BLOCK_GAIN`` times ``b`` single products (``t_single`` s each), else 1."""
    return b if t_block < AUTO_BLOCK_GAIN * b * t_single else 1


def _auto_block_size(matvec: Callable, dim: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[int, dict]:
    """``block_size="auto"``: 1 on CPU without any trial (per vector, a block product costs
    0.93-2.1x a single product on every model measured there, bench/results/bench_speed.md);
    elsewhere one single and one ``AUTO_BLOCK`` product, timed (synchronised), decide."""
    b = min(AUTO_BLOCK, dim)
    if device.type == "cpu" or b < 2:
        return 1, {"block_rule": "cpu"}
    g = torch.Generator().manual_seed(0)
    V = torch.randn(dim, b, generator=g, dtype=dtype).to(device)

    def timed(x: torch.Tensor) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
        sync(device)
        t0 = time.perf_counter()
        matvec(x)
        sync(device)
        return time.perf_counter() - t0

    timed(V[:, 0].contiguous())  # warm-up (kernels, caches)
    t1, tb = timed(V[:, 0].contiguous()), timed(V)
    return choose_block_size(t1, tb, b), {"block_rule": "timed", "block_trial_single_s": t1,
                                          "block_trial_per_vector_s": tb / b,
                                          "block_trial_matvecs": 2 + b}


def default_ncv(dim: int, k: int, block_size: int = 1) -> int:
    """Default basis size: ARPACK's ``max(2k + 1, 20)``, at least ``k + 2 b``, at most dim."""
    return min(dim, max(2 * k + 1, 20, k + 2 * block_size))


_FN = "hbk.lanczos"
# VerifyStatus of csrc/hbk/lanczos.h
_VERIFY = {0: "not_converged", 1: "checked", 2: "complete", 3: "off", 4: "no_room",
           5: "no_budget"}


def _check_v0(v0: Any, dim: int, b: int) -> torch.Tensor:
    """``v0`` as a float64 CPU ``(dim, c)`` block, ``1 <= c <= b``, finite and nonzero."""
    check_tensor(_FN, "v0", v0, dims=(1, 2))
    if not v0.is_floating_point():
        fail(_FN, "v0 to be a floating-point tensor", v0.dtype, TypeError, raw=True)
    v = v0.detach().to("cpu", torch.float64)
    if v.dim() == 1:
        v = v[:, None]
    if v.shape[0] != dim or not 1 <= v.shape[1] <= b:
        fail(_FN, f"v0 of shape ({dim},) or ({dim}, c) with 1 <= c <= block_size = {b}",
             f"shape {tuple(v0.shape)}", raw=True)
    if not bool(torch.isfinite(v).all()):
        fail(_FN, "a finite v0", "NaN or inf values", raw=True)
    if not bool((v.norm(dim=0) > 0).all()):
        fail(_FN, "a nonzero v0 (every column)", "a zero column", raw=True)
    return v


def _check_device(device: Any, v0: Any) -> torch.device:
    if device is None:
        return v0.device if isinstance(v0, torch.Tensor) else torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        fail(_FN, "device to be None, a str or a torch.device", device, TypeError)
    try:
        return torch.device(device)
    except RuntimeError:
        fail(_FN, "device to be a valid device name such as 'cpu' or 'cuda:0'", device)


def _start_block(dim: int, b: int, v: torch.Tensor | None, seed: int | None,
                 dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """The (dim, b) start block (``v``'s columns first, random columns after) and the seed
    of the driver's own random vectors."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    gen = torch.Generator().manual_seed(seed)
    c = 0 if v is None else v.shape[1]
    start = torch.empty(dim, b, dtype=dtype, device=device)
    if c:
        start[:, :c] = v
    if c < b:
        start[:, c:] = torch.randn(dim, b - c, generator=gen, dtype=torch.float64)
    return start, seed


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
    block_size: int | str = 1,
    quiet: bool = True,
    store_products: bool = True,
    reorth: str = "selective",
    verify: bool = True,
) -> LanczosResult:
    """k extreme eigenpairs of a symmetric linear operator (thick-restart Lanczos).

    Thick-restart Lanczos (Wu & Simon) with full reorthogonalisation (classical Gram-Schmidt
    against the whole basis, as GEMVs/GEMMs on the vectors' device), locking of converged
    pairs, convergence test ``|beta_m s_mi| <= tol * max(|theta_i|, |theta_1|)`` (theta_1:
    the most wanted Ritz value) and the projected problem in float64. After convergence a
    probe checks for missed pairs (``verify``).

    Args:
        matvec: ``A``: takes ``(dim,)`` (``block_size == 1``) or ``(dim, b)`` and returns the
            same shape (``(dim, 1)`` is accepted for a vector), a floating-point tensor on the
            basis device. Its argument is a view of the Lanczos basis: read it, never modify
            it in place or keep it. Exceptions it raises reach the caller unchanged.
        dim: order of ``A``.
        k: number of eigenpairs, ``1 <= k <= dim``.
        which: "LA" (largest algebraic), "SA" (smallest algebraic), "LM" (largest magnitude).
        tol: relative residual tolerance, ``0 < tol < 1``.
        ncv: basis size, ``k + block_size <= ncv <= dim`` (default :func:`default_ncv`:
            ``max(2k + 1, 20)``, at most dim).
        max_matvecs: budget of single-vector products, at least ``block_size`` (default
            ``max(1000, 50 * ncv)``).
        v0: ``(dim,)`` or ``(dim, c)`` start vector(s), ``c <= block_size``, finite, no zero
            column; random otherwise (the other columns of the start block are random).
        seed: seed (a non-negative int) of the random start and of the driver's random
            vectors; ``None`` draws one from torch's global generator.
        dtype: basis dtype, float32 or float64.
        device: basis device (default: v0's device, else CPU).
        block_size: vectors per ``matvec`` call, ``1 <= block_size <= dim``; > 1 runs block
            Lanczos with ``(dim, b)`` blocks. ``"auto"``: 1 on CPU, with no trial (per vector,
            a block of 8 costs 1.0-1.1x a single product on the paper MLP, 1.6-1.9x on the
            transformer, 2.1x on the MNIST CNN and 0.93x on LeNet-5 there, never the 0.7x
            that the extra products of block Lanczos need); on other devices one single and one
            4-vector product are timed (6 products, not counted in ``num_matvecs``, recorded
            in ``profile``) and 4 is used when the block's per-vector time is below 0.7x.
        quiet: no progress bar when True.
        store_products: keep ``A V`` (twice the basis memory) so that the final residuals need
            no extra ``matvec`` calls; when False they cost ``k`` products (counted).
        reorth: "twice": two classical Gram-Schmidt passes against the whole basis for every
            new vector; "selective" (default): first the local recurrence terms, then one
            full pass, and a second one only when it cancels, ``|w'| < |w| / sqrt(2)``
            (Daniel-Gragg-Kaufman-Stewart criterion). (Skipping the full pass's correction when
            its coefficients are below ``0.01 sqrt(eps) |w|`` was tried: on the paper MLP,
            top-25, float64 HVPs, it skipped 28 of 240 corrections but took 10 more products
            and a 4.9e-7 instead of 3e-9 eigenvalue error, so every full pass corrects.)
        verify: after the k pairs converged, lock them and run a probe: a fresh Krylov space
            from a random vector orthogonal to them. A single start vector reaches one
            direction of each eigenspace, so further copies of a repeated eigenvalue (and any
            wanted pair the first space missed) appear there as Ritz values more wanted than
            the k-th (by more than ``10 tol``); they are converged and locked and the probe
            repeats. A probe that finds nothing ends after ``max(10, r s1)`` products, s1 being
            those the main phase needed for its first converged pair and ``r = min(1, 2L / (L
            + log(1/tol)))``, ``L = log(sqrt(dim))`` (the share of that convergence a random
            component needs to rise above the k-th value, doubled). A repeated eigenvalue is
            so returned to its multiplicity among the k, which ARPACK's eigsh does only
            sometimes. The probe costs products (``num_matvecs - main_matvecs``: 5-10 on the
            paper MLP's Hessian); False skips it.

    Returns:
        :class:`LanczosResult`. Pairs not converged within ``max_matvecs`` are returned with
        ``converged`` False, and a ``RuntimeWarning`` says so; a ``RuntimeWarning`` also says
        when the check for missed pairs could not run or was cut short.

    Raises:
        TypeError: ``matvec`` not callable, an argument of the wrong type (e.g. a str seed), a
            bad dtype, or a ``matvec`` result that is not a floating-point tensor on the
            basis device.
        ValueError: bad sizes or settings, or a ``matvec`` result of the wrong shape or with
            NaN/inf values.
    """
    t0 = time.perf_counter()
    if not callable(matvec):
        fail(_FN, "matvec to be callable", matvec, TypeError)
    dim = check_int(_FN, "dim", dim, 1)
    k = check_int(_FN, "k", k, 1, dim)
    check_choice(_FN, "which", which, _WHICH)
    tol = check_float(_FN, "tol", tol, 0.0, 1.0, lo_open=True, hi_open=True)
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOATS:
        fail(_FN, "dtype float32 or float64", dtype, TypeError, raw=True)
    device = _check_device(device, v0)
    auto_info: dict = {}
    if block_size == "auto":
        block_size, auto_info = _auto_block_size(matvec, dim, dtype, device)
    block_size = check_int(_FN, "block_size", block_size, 1, dim)
    if ncv is None:
        ncv = default_ncv(dim, k, block_size)
    else:
        ncv = check_int(_FN, "ncv", ncv, 1, dim)
        if ncv != dim and ncv < k + block_size:
            fail(_FN, f"k + block_size <= ncv <= dim (or ncv = dim), got ncv = {ncv} (k = {k}, "
                 f"block_size = {block_size}, dim = {dim})", "", raw=True)
    check_choice(_FN, "reorth", reorth, ("selective", "twice"))
    max_matvecs = (max(1000, 50 * ncv) if max_matvecs is None
                   else check_int(_FN, "max_matvecs", max_matvecs, block_size))
    seed = check_seed(_FN, "seed", seed)
    for name, flag in (("quiet", quiet), ("store_products", store_products), ("verify", verify)):
        check_bool(_FN, name, flag)
    v = None if v0 is None else _check_v0(v0, dim, block_size)
    start, seed = _start_block(dim, block_size, v, seed, dtype, device)

    bar = None
    progress = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_matvecs, desc=_FN, unit="mv", leave=False, mininterval=0.5)

        def progress(num_matvecs: int, num_converged: int, num_restarts: int) -> None:
            bar.n = num_matvecs  # tqdm redraws at most every mininterval
            bar.set_postfix_str(f"locked {num_converged}/{k}, restarts {num_restarts}",
                                refresh=False)
            bar.update(0)

    t_py = time.perf_counter() - t0
    try:
        out = _C.lanczos(matvec, start, k, which, tol, ncv, max_matvecs, block_size,
                         store_products, reorth == "twice", seed, verify, progress)
    finally:
        if bar is not None:
            bar.close()
    t1 = time.perf_counter()
    status = _VERIFY[int(out["verify_status"])]
    res = LanczosResult(
        eigenvalues=out["eigenvalues"],
        eigenvectors=out["eigenvectors"],
        residuals=out["residuals"],
        converged=out["converged"],
        num_matvecs=int(out["num_matvecs"]),
        num_restarts=int(out["num_restarts"]),
        reorth_passes=int(out["reorth_passes"]),
        matvec_seconds=float(out["matvec_seconds"]),
        total_seconds=0.0,
        which=which,
        tol=tol,
        ncv=ncv,
        block_size=block_size,
        verify_status=status,
        num_probes=int(out["num_probes"]),
        probe_found=int(out["probe_found"]),
        main_matvecs=int(out["main_matvecs"]),
        profile={**dict(out["profile"]), **auto_info},
    )
    nconv = int(res.converged.sum())
    if nconv < k:
        warnings.warn(
            f"{_FN}: only {nconv} of {k} eigenpairs converged to tol={tol:g} "
            f"({res.num_matvecs} matvecs, max_matvecs={max_matvecs}); the others are returned "
            "with converged=False",
            RuntimeWarning,
            stacklevel=2,
        )
    elif status in ("no_room", "no_budget"):
        why = (f"ncv={ncv} leaves no room for a probe next to the {k} converged vectors"
               if status == "no_room" else f"max_matvecs={max_matvecs} was reached during it")
        warnings.warn(
            f"{_FN}: the check for missed (e.g. repeated) eigenvalues did not finish: {why}; "
            "a repeated eigenvalue may be returned fewer times than its multiplicity (raise "
            "ncv or max_matvecs, or use block_size >= the multiplicity)",
            RuntimeWarning,
            stacklevel=2,
        )
    now = time.perf_counter()
    res.profile["python_seconds"] = t_py + (now - t1)
    res.total_seconds = now - t0
    return res
