"""Eigenvalues and gradient alignments of a dense symmetric matrix without its eigenvectors.

The measure ``G`` needs, for every eigenvector ``v_j`` of the Hessian ``H``, only the largest
and the mean ``|cos(g_s, v_j)|`` over ``n`` training gradients ``g_s`` -- not ``v_j`` itself.
``eigh`` with vectors spends most of its time forming the ``p x p`` eigenvector matrix
(the back-transformation ``Q S`` and the divide-and-conquer merges). This module skips the
back-transformation:

1. ``H = Q T Q^T`` (LAPACK ``sytrd``; ``T`` tridiagonal, ``Q`` kept as Householder reflectors
   in the overwritten ``H``);
2. ``U = Ghat Q`` for the ``n`` unit-normalised gradients ``Ghat`` (``ormtr``, ``O(n p^2)``);
3. ``T = S diag(lambda) S^T``: by divide and conquer (``stedc``, default: its merges are
   GEMMs; it scales ``T`` and splits it at negligible off-diagonals itself; 2.6x faster than
   ``stemr`` at ``p = 4000``) or by MRRR (``stemr``, ``solver="stemr"``: ``O(p)`` flops per
   eigenvector but a large constant); with two or more threads it runs beside step 2;
4. the cosines ``C = U S`` in column chunks (GEMMs), reduced to ``max_s |C|`` and
   ``mean_s |C|`` per eigenvector, or kept whole (``(n, p)``) for the per-sample figure.

Since ``v_j = Q s_j``, ``C[s, j] = <ghat_s, Q s_j> = <Q^T ghat_s, s_j>``: the same numbers as
``eigh`` plus a GEMM, up to the sign of each eigenvector (which ``|cos|`` does not see).

Routes measured and left out (bench/bench_gmeasure.py, bench/results/gmeasure*.md):
``dlaed0`` with ``ICOMPQ = 1`` would return ``U S`` without ``S``, but LAPACK requires
``QSIZ >= p`` (``INFO = -2`` for ``n < p``, the usual case), and padding ``U`` to ``p`` rows
costs what forming ``S`` costs. The MKL internals that libtorch_cpu exports
(``mkl_lapack_dsytrd``, ...) take 64-bit integers (32-bit ones corrupt memory) and were 3.5x
slower than scipy's ``sytrd`` at ``p = 3000`` here, so they are not used. ``sytrd`` (level-2
bound: it reads the trailing matrix once per column, so threads barely help) is the largest
stage at large ``p``.

Memory (``p`` parameters, ``n`` gradients, ``c = chunk``, ``b`` bytes per entry of ``dtype``),
what the call allocates: a ``p x p`` working copy of ``H`` unless ``overwrite=True`` (freed
after step 2 when ``top_vectors=0``); ``U`` (``n x p``) and a float64 ``n x p`` temporary while
normalising; the ``p x p`` eigenvectors ``S`` of ``T`` (plus, for ``stedc``, a ``p^2``
workspace freed when it returns); ``(p + 2 n) c`` per GEMM chunk; ``n p`` more for
``return_alignments``. With ``K = p^2`` while the working copy exists during step 3 (it does
with ``top_vectors`` or two or more threads, unless ``overwrite=True``; else ``K = 0``) and
``s = 2`` for ``stedc`` (1 for ``stemr``), the peak is about ``b max(s p^2 + n p + K,
p^2 + n p + (p + 2 n) c + [n p with return_alignments]) + 8 n p``; the input ``H`` is the
caller's (so ``overwrite=True`` with ``stedc`` needs ``2 b p^2`` beside it, as ``eigh``
does). ``torch.linalg.eigh`` with vectors allocates the ``p x p`` output and a ``syevd``
workspace of about ``2 p^2`` beside the input.

LAPACK is scipy's (``scipy.linalg.lapack`` for ``sytrd``; ``ormtr``, ``stedc`` and ``stemr``
through the function pointers that ``scipy.linalg.cython_lapack`` exports, called with
``ctypes``, which releases the GIL). The GEMMs are torch's.
"""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .checks import check_bool, check_choice, check_float, check_int, check_tensor, fail
from .results import Result

__all__ = ["AlignmentSpectrum", "alignment_spectrum"]

_FN = "hbk.alignment_spectrum"
_RULES = ("max", "mean")
_SOLVERS = ("stedc", "stemr")
_PARALLEL_MIN_P = 2048  # below this p the call runs on one thread

# ----------------------------------------------------------------------------- LAPACK access
_P = ctypes.c_void_p
_FUNCS: dict[str, ctypes._CFuncPtr] = {}


def _lapack(name: str, nargs: int):
    """The ctypes function of ``scipy.linalg.cython_lapack.<name>`` (Fortran calling convention:
    every argument by pointer, no hidden string lengths in scipy's wrappers)."""
    f = _FUNCS.get(name)
    if f is None:
        import scipy.linalg.cython_lapack as cl

        cap = cl.__pyx_capi__[name]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        addr = api.PyCapsule_GetPointer(cap, api.PyCapsule_GetName(cap))
        f = ctypes.CFUNCTYPE(None, *([_P] * nargs))(addr)
        _FUNCS[name] = f
    return f


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(_P)


def _int(v: int):
    return ctypes.byref(ctypes.c_int(int(v)))


def _ch(s: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(s.encode())


def _sytrd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``sytrd`` (lower) of the F-ordered ``a`` in place: reflectors in ``a``, ``d``, ``e``, ``tau``."""
    from scipy.linalg import lapack

    pre = "d" if a.dtype == np.float64 else "s"
    lwork = int(getattr(lapack, pre + "sytrd_lwork")(a.shape[0], lower=1)[0])
    c, d, e, tau, info = getattr(lapack, pre + "sytrd")(a, lower=1, lwork=max(lwork, 1),
                                                          overwrite_a=1)
    if info != 0:
        fail(_FN, "sytrd to succeed", f"info = {info}", FloatingPointError, raw=True)
    if c.ctypes.data != a.ctypes.data:  # scipy copied: the caller's memory estimate is off
        a[...] = c
    return a, d, e, tau


def _ormtr(a: np.ndarray, tau: np.ndarray, c: np.ndarray, trans: str) -> None:
    """``c <- Q^T c`` (``trans="T"``) or ``Q c`` (``"N"``) in place; ``c`` is ``(p, m)`` F-ordered."""
    f = _lapack("dormtr" if a.dtype == np.float64 else "sormtr", 13)
    p, m = c.shape
    info = ctypes.c_int(0)
    work = np.empty(1, dtype=a.dtype)
    args = [_ch("L"), _ch("L"), _ch(trans), _int(p), _int(m), _ptr(a), _int(a.shape[0]),
            _ptr(tau), _ptr(c), _int(max(p, 1))]
    f(*args, _ptr(work), _int(-1), ctypes.byref(info))
    lwork = max(int(work[0]), 1)
    work = np.empty(lwork, dtype=a.dtype)
    f(*args, _ptr(work), _int(lwork), ctypes.byref(info))
    if info.value != 0:
        fail(_FN, "ormtr to succeed", f"info = {info.value}", FloatingPointError, raw=True)


def _stemr(d: np.ndarray, e: np.ndarray, il: int, iu: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Eigenpairs ``il..iu`` (1-based, ascending) of the tridiagonal ``(d, e)`` by MRRR.

    Returns ``(w (k,), Z (p, k) F-ordered, fell_back)``; falls back to bisection + inverse iteration
    (``stebz``/``stein`` through scipy) if ``stemr`` reports a failure.
    """
    dt = d.dtype
    f = _lapack("dstemr" if dt == np.float64 else "sstemr", 21)
    p, k = d.size, iu - il + 1
    ctype = ctypes.c_double if dt == np.float64 else ctypes.c_float
    vl, vu = ctype(0), ctype(0)
    m, info, tryrac = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(1)
    w = np.empty(p, dtype=dt)
    z = np.empty((p, k), dtype=dt, order="F")
    isuppz = np.empty(2 * k, dtype=np.int32)
    dd = d.copy()
    ee = np.zeros(p, dtype=dt)
    ee[: p - 1] = e

    def call(work, lwork, iwork, liwork):
        f(_ch("V"), _ch("I"), _int(p), _ptr(dd), _ptr(ee), ctypes.byref(vl), ctypes.byref(vu),
          _int(il), _int(iu), ctypes.byref(m), _ptr(w), _ptr(z), _int(p), _int(k), _ptr(isuppz),
          ctypes.byref(tryrac), _ptr(work), _int(lwork), _ptr(iwork), _int(liwork),
          ctypes.byref(info))

    work, iwork = np.empty(1, dtype=dt), np.empty(1, dtype=np.int32)
    call(work, -1, iwork, -1)
    lwork, liwork = max(int(work[0]), 1), max(int(iwork[0]), 1)
    if info.value == 0:
        dd[:], ee[: p - 1], ee[p - 1] = d, e, 0
        call(np.empty(lwork, dtype=dt), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if info.value == 0 and m.value == k:
        return w[:k].copy(), z, False
    import scipy.linalg

    w2, z2 = scipy.linalg.eigh_tridiagonal(d, e, select="i", select_range=(il - 1, iu - 1),
                                           lapack_driver="stebz")
    return w2.astype(dt), np.asfortranarray(z2.astype(dt)), True


def _stedc(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """All eigenpairs of the tridiagonal ``(d, e)`` by divide and conquer (``stedc``, ``COMPZ="I"``:
    its merges are GEMMs, so BLAS threads help; it scales ``T`` and splits it at negligible
    off-diagonals itself).

    Returns ``(w (p,) ascending, Z (p, p) F-ordered, fell_back)``; falls back to :func:`_stemr`
    if ``stedc`` reports a failure. Workspace: ``p^2 + 4 p + 1`` entries beside ``Z``.
    """
    dt = d.dtype
    f = _lapack("dstedc" if dt == np.float64 else "sstedc", 10)
    p = d.size
    dd, ee = d.copy(), np.zeros(max(p - 1, 1), dtype=dt)
    ee[: p - 1] = e
    z = np.empty((p, p), dtype=dt, order="F")
    info = ctypes.c_int(0)
    lwork, liwork = 1 + 4 * p + p * p, 3 + 5 * p  # the documented minima for COMPZ = "I"
    work, iwork = np.empty(lwork, dtype=dt), np.empty(liwork, dtype=np.int32)
    f(_ch("I"), _int(p), _ptr(dd), _ptr(ee), _ptr(z), _int(p), _ptr(work), _int(lwork),
      _ptr(iwork), _int(liwork), ctypes.byref(info))
    del work, iwork
    if info.value == 0 and np.isfinite(dd).all():
        return dd, z, False
    del z
    return _stemr(d, e, 1, p)[0:2] + (True,)


def _blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return nullcontext()
    return threadpool_limits(threads, user_api="blas")


# ----------------------------------------------------------------------------- result
@dataclass
class AlignmentSpectrum(Result):
    """All eigenvalues of a symmetric ``H`` and how the training gradients align with each
    eigenvector ``v_j``.

    Attributes:
        eigenvalues: ``(p,)`` float64, descending.
        max_abs: ``(p,)`` float64, ``max_s |cos(g_s, v_j)|`` (0 when every gradient is zero).
        mean_abs: ``(p,)`` float64, ``mean_s |cos(g_s, v_j)|``.
        num_samples: ``n``.
        dtype: the dtype of the factorisation (``"float64"`` or ``"float32"``).
        seconds: wall time of each stage (``sytrd``, ``ormtr``, ``stemr_gemm``, ``total``).
        peak_bytes: the estimated peak of the arrays this call allocates (module docstring).
        stemr_fallback: True when the solver failed and a fallback ran (``stedc`` -> ``stemr``,
            ``stemr`` -> ``stebz``/``stein``).
        solver: the tridiagonal eigensolver asked for (``"stedc"`` or ``"stemr"``).
        alignments: ``(n, p)`` signed cosines ``C[s, j]`` (column ``j`` for eigenvalue ``j``,
            the sign of each column matching ``vectors``), or None unless requested.
        vectors: ``(p, k)`` the top-``k`` unit eigenvectors (``top_vectors=k``), or None.
    """

    eigenvalues: torch.Tensor
    max_abs: torch.Tensor
    mean_abs: torch.Tensor
    num_samples: int
    dtype: str
    seconds: dict
    peak_bytes: int
    stemr_fallback: bool = False
    solver: str = "stemr"
    alignments: torch.Tensor | None = field(default=None, repr=False)
    vectors: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_params(self) -> int:
        return int(self.eigenvalues.numel())

    def count(self, eps: float, rule: str = "max") -> int:
        """Eigenvectors marked as aligned: ``max_abs >= eps`` (``"max"``) or
        ``mean_abs > eps`` (``"mean"``, the paper's Eq. 6)."""
        fn = "hbk.AlignmentSpectrum.count"
        check_choice(fn, "rule", rule, _RULES)
        eps = check_float(fn, "eps", eps, lo=0.0)
        if rule == "max":
            return int((self.max_abs >= eps).sum())
        return int((self.mean_abs > eps).sum())

    def to_dict(self) -> dict:
        return {"num_params": self.num_params, "num_samples": self.num_samples,
                "dtype": self.dtype, "seconds": self.seconds, "peak_bytes": self.peak_bytes,
                "stemr_fallback": self.stemr_fallback, "solver": self.solver,
                "top_eigenvalues": self.eigenvalues[:25], "max_abs": self.max_abs,
                "mean_abs": self.mean_abs}


# ----------------------------------------------------------------------------- entry point
def _check_symmetric(H: torch.Tensor, rtol: float) -> None:
    p = H.shape[0]
    scale = 0.0
    worst = 0.0
    step = max(1, (1 << 22) // max(p, 1))  # ~4M entries per block
    for i in range(0, p, step):
        rows, cols = H[i : i + step], H[:, i : i + step].T
        scale = max(scale, float(rows.abs().max()))
        worst = max(worst, float((rows - cols).abs().max()))
    if not np.isfinite(scale):
        fail(_FN, "a finite H", "NaN/inf entries", raw=True)
    if worst > rtol * scale:
        fail(_FN, f"a symmetric H (max |H - H^T| <= {rtol:g} max |H|)",
             f"max |H - H^T| = {worst:.3g}, max |H| = {scale:.3g}", raw=True)


def alignment_spectrum(
    H: torch.Tensor,
    grads: torch.Tensor,
    *,
    return_alignments: bool = False,
    top_vectors: int = 0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    chunk: int = 1024,
    threads: int | None = None,
    symmetry_rtol: float = 1e-5,
    solver: str = "stedc",
) -> AlignmentSpectrum:
    """Eigenvalues of ``H`` and the per-eigenvector max/mean ``|cos|`` with ``n`` gradients.

    Equal (to round-off, up to eigenvector signs) to ``eigh(H)`` followed by the cosines of
    the rows of ``grads`` with every eigenvector, without forming the eigenvectors (module
    docstring). Where eigenvalues are repeated the eigenvectors are not unique, so neither
    route's per-eigenvector cosines are; what both determine is each sample's projection on
    the eigenspace (``sum`` of squared cosines over the cluster).

    Args:
        H: ``(p, p)`` symmetric, float32 or float64, CPU; one triangle is used (the symmetry
            is checked to ``symmetry_rtol``).
        grads: ``(n, p)`` gradients (any float dtype, CPU, finite); zero rows give cosine 0.
        return_alignments: also return the ``(n, p)`` signed cosine matrix (per-sample
            figure).
        top_vectors: also return the top-``k`` eigenvectors ``(p, k)`` (``Q`` applied to
            ``k`` columns only).
        dtype: dtype of the factorisation (default ``H.dtype``). float32 halves memory and
            time; its cosines agree with float64 to about ``1e-4`` for eigenvectors whose
            eigenvalue gap is well above ``1e-6 |H|`` (bench/bench_gmeasure.py).
        overwrite: let the call destroy ``H`` (when ``H`` is contiguous and of ``dtype``),
            saving one ``p x p`` copy.
        chunk: eigenvectors per GEMM chunk (memory ``(p + 2 n) chunk``).
        threads: BLAS threads of ``sytrd``/``ormtr`` (default ``torch.get_num_threads()``;
            one below ``p = 2048``); the GEMMs use torch's threads.
        symmetry_rtol: allowed ``max |H - H^T| / max |H|``.
        solver: eigenpairs of ``T``: ``"stedc"`` (divide and conquer, faster, ``p^2`` more
            workspace) or ``"stemr"`` (MRRR, slower, less memory). With two or more threads
            either runs beside ``ormtr``.

    Returns:
        :class:`AlignmentSpectrum` (eigenvalues descending, in float64).

    Raises:
        TypeError: for non-tensors, non-float dtypes or non-CPU tensors.
        ValueError: for shape mismatches, non-symmetric or non-finite inputs, bad options.
    """
    t0 = time.perf_counter()
    check_tensor(_FN, "H", H, dims=(2,), floating=True)
    check_tensor(_FN, "grads", grads, dims=(2,))
    if not grads.is_floating_point():
        fail(_FN, "grads to be a floating-point tensor", grads.dtype, TypeError, raw=True)
    for name, t in (("H", H), ("grads", grads)):
        if t.device.type != "cpu":
            fail(_FN, f"{name} on the CPU", t.device, TypeError, raw=True)
    p = H.shape[0]
    if H.shape[1] != p or p == 0:
        fail(_FN, "a non-empty square H", f"shape {tuple(H.shape)}", raw=True)
    n = grads.shape[0]
    if grads.shape[1] != p or n == 0:
        fail(_FN, f"grads of shape (n >= 1, {p})", f"shape {tuple(grads.shape)}", raw=True)
    check_bool(_FN, "return_alignments", return_alignments)
    check_bool(_FN, "overwrite", overwrite)
    top_vectors = check_int(_FN, "top_vectors", top_vectors, 0, p)
    chunk = check_int(_FN, "chunk", chunk, 1)
    threads = check_int(_FN, "threads", torch.get_num_threads() if threads is None else threads, 1)
    symmetry_rtol = check_float(_FN, "symmetry_rtol", symmetry_rtol, lo=0.0)
    solver = check_choice(_FN, "solver", solver, _SOLVERS)
    dtype = H.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        fail(_FN, "dtype float32 or float64", dtype, TypeError, raw=True)
    _check_symmetric(H, symmetry_rtol)
    gnorm = grads.detach().double().norm(dim=1)
    if not torch.isfinite(gnorm).all():
        fail(_FN, "finite grads", f"NaN/inf in {int((~torch.isfinite(gnorm)).sum())} rows", raw=True)
    npdt = np.float64 if dtype == torch.float64 else np.float32
    nbytes = np.dtype(npdt).itemsize

    if p < _PARALLEL_MIN_P:  # small problems: thread start-up and barriers cost more than they save
        threads = 1
    secs: dict[str, float] = {}
    with _blas_threads(threads):
        # 1. H = Q T Q^T in the working matrix (H^T viewed F-ordered is H: symmetric).
        t = time.perf_counter()
        if overwrite and H.dtype == dtype and H.is_contiguous():
            work = H.detach().numpy().T
        else:
            work = np.empty((p, p), dtype=npdt, order="F")
            work[...] = H.detach().to(dtype).numpy().T
        work, d, e, tau = _sytrd(work)
        if not (np.isfinite(d).all() and np.isfinite(e).all()):
            fail(_FN, "finite tridiagonal entries", "NaN/inf after sytrd", FloatingPointError,
                 raw=True)
        secs["sytrd"] = time.perf_counter() - t

        # 3. All eigenpairs of T in one call: stedc (divide and conquer) or MRRR (range "A":
        # dqds eigenvalues; separate index-range calls can return one vector twice across a
        # split cluster). With two or more threads it runs beside step 2 (ctypes releases the
        # GIL; ormtr gets one thread fewer): on a loaded machine two single-threaded calls
        # side by side beat two multi-threaded ones in a row (bench/results/gmeasure_p4000*).
        t = time.perf_counter()
        solve = partial(_stedc, d, e) if solver == "stedc" else partial(_stemr, d, e, 1, p)
        overlap = threads > 1
        pool = ThreadPoolExecutor(1) if overlap else None
        future = pool.submit(solve) if pool is not None else None

        # 2. U = Ghat Q: rows of unit gradients (zero rows stay zero), Q^T applied in place.
        t2 = time.perf_counter()
        safe = torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm))
        U = (grads.detach().double() / safe[:, None]).to(dtype).contiguous()
        with _blas_threads(threads - 1) if overlap else nullcontext():
            _ormtr(work, tau, U.numpy().T, "T")  # (p, n) F-ordered view of U
        secs["ormtr"] = time.perf_counter() - t2

        if not top_vectors:
            del work  # our copy is freed here; with overwrite=True H stays the caller's
        if future is not None:
            w, S, fell_back = future.result()
            pool.shutdown()
        else:
            w, S, fell_back = solve()
        del d, e
        secs[solver] = time.perf_counter() - t  # overlapping ormtr when threads > 1
        vectors = None
        if top_vectors:  # v_j = Q s_j for the top k only
            V = S[:, ::-1][:, :top_vectors].copy(order="F")  # (1, 1): no negative stride
            _ormtr(work, tau, V, "N")
            vectors = torch.from_numpy(V)
            del work

        # 4. Cosines C = U S, column chunks in descending eigenvalue order, reduced.
        t = time.perf_counter()
        evals = torch.from_numpy(w.astype(np.float64)).flip(0)
        max_abs = torch.empty(p, dtype=torch.float64)
        mean_abs = torch.empty(p, dtype=torch.float64)
        C_all = torch.empty(n, p, dtype=dtype) if return_alignments else None
        St = torch.from_numpy(S)  # (p, p), column-major strides: no copy
        for j0 in range(0, p, chunk):
            j1 = min(p, j0 + chunk)
            C = U @ St[:, p - j1 : p - j0].flip(1)  # descending positions j0..j1-1
            A = C.abs()
            max_abs[j0:j1] = A.amax(dim=0).double()
            mean_abs[j0:j1] = A.double().mean(dim=0)
            if C_all is not None:
                C_all[:, j0:j1] = C
        secs["gemm"] = time.perf_counter() - t
    if not torch.isfinite(evals).all():
        fail(_FN, "finite eigenvalues", "NaN/inf from stemr", FloatingPointError, raw=True)
    secs["total"] = time.perf_counter() - t0
    own = not (overwrite and H.dtype == dtype and H.is_contiguous())
    chunk = min(chunk, p)
    # entries alive in each stage (module docstring): solving T (S, stedc's workspace, U and
    # the working copy while it lives), the top vectors (S, U, copy, V), the GEMMs
    copy = p * p if own and (top_vectors or threads > 1) else 0
    solving = (2 if solver == "stedc" else 1) * p * p + n * p + copy
    vecs = p * p + n * p + (p * p + p * top_vectors if top_vectors else 0) * own
    gemm = p * p + n * p + (p + 2 * n) * chunk + (n * p if return_alignments else 0)
    peak = max(solving, vecs, gemm)
    peak = nbytes * peak + 8 * n * p
    return AlignmentSpectrum(
        eigenvalues=evals, max_abs=max_abs, mean_abs=mean_abs, num_samples=n,
        dtype=str(dtype).replace("torch.", ""), seconds=secs, peak_bytes=int(peak),
        stemr_fallback=fell_back, solver=solver, alignments=C_all, vectors=vectors,
    )
