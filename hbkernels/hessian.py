"""Curvature operators of a training loss and what is computed from them.

Layout of the core (each module one job; the core never imports :mod:`hbkernels.boundary`):

* :mod:`hbkernels.losses` -- the loss and its reduction (stated or probed), closed-form output
  Hessians; :mod:`hbkernels.data` -- ``(X, y)``, lists or DataLoaders of tuple/dict batches,
  streamed; :mod:`hbkernels.objective` -- the total loss ``L = sum_b w_b loss_b`` over all
  samples (``w_b = n_b / N`` for "mean", 1 for "sum"), functional evaluation, determinism checks;
* :mod:`hbkernels.operators` -- the :class:`~hbkernels.operators.LinearOperator` base (checks,
  counting, ``@``, ``to_scipy``);
* :mod:`hbkernels.hvp` -- one class per product method and the ``auto`` rule;
* this module -- :class:`HessianOperator` and :class:`GGNOperator` (an ``Objective`` plus one
  ``hvp`` strategy, on the base), :func:`eigs` / :func:`hessian_eigs` / :func:`ggn_eigs`,
  :func:`exact_hessian` / :func:`exact_ggn` (memory-budgeted assembly from block products,
  the lower triangle only where the method exploits symmetry; for the Hessian by default
  ``J^T D J`` plus the residual's cover columns, :mod:`hbkernels.hvp.split`), :func:`hessian_spectrum`;
* :mod:`hbkernels.estimators` -- trace and density on any operator (re-exported here).

Every operator is the curvature of the objective with respect to the selected parameters, in
``model.parameters()`` order (each tensor flattened row-major).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .checks import check_bool, check_choice, check_int, fail
from .estimators import SpectralDensity, TraceResult, hessian_trace, spectral_density
from .hvp import GGN_METHODS, HESSIAN_METHODS, HVPMethod, ggn_method, hessian_method
from .lanczos import LanczosResult, lanczos
from .objective import Objective
from .operators import LinearOperator, MatrixOperator

_log = logging.getLogger("hbkernels")

__all__ = [
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "MatrixOperator",
    "SpectralDensity",
    "TraceResult",
    "eigs",
    "exact_ggn",
    "exact_hessian",
    "ggn_eigs",
    "hessian_eigs",
    "hessian_spectrum",
    "hessian_trace",
    "spectral_density",
]


class CurvatureOperator(LinearOperator):
    """An :class:`~hbkernels.objective.Objective` and one product strategy on the operator base.

    Subclasses fix the public name and how ``method`` picks the strategy. Keyword arguments as
    for :class:`HessianOperator`.

    Attributes:
        objective: the :class:`~hbkernels.objective.Objective`.
        strategy: the :class:`~hbkernels.hvp.HVPMethod` computing the products.
        method: the method in use (``"auto"`` resolved).
        methods_used: ``{"single": method, "block": method}`` (kept for older callers).
        names, shapes, numels: the selected parameters; num_samples: ``N``.
    """

    methods: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, *, params: Any = None,
                 method: str = "auto", dtype: torch.dtype | None = None,
                 reduction: str | None = None, forward: Callable | None = None,
                 check_deterministic: bool = True, allow_shuffle: bool = False,
                 cache: bool | str = "auto") -> None:
        fn = f"hbk.{self.name}"
        check_choice(fn, "method", method, self.methods)
        self.objective = Objective(fn, model, loss_fn, data, params=params, forward=forward,
                                   dtype=dtype, reduction=reduction, allow_shuffle=allow_shuffle,
                                   check_deterministic=check_deterministic, cache=cache)
        super().__init__(self.objective.dim, self.objective.dtype, self.objective.device)
        self.strategy: HVPMethod = self._strategy(fn, method)
        self.method = self.strategy.name
        self.methods_used = {"single": self.method, "block": self.method}

    def _strategy(self, fn: str, method: str) -> HVPMethod:  # pragma: no cover - abstract
        raise NotImplementedError

    # names of the objective, for callers
    names = property(lambda self: self.objective.names)
    shapes = property(lambda self: self.objective.shapes)
    numels = property(lambda self: self.objective.numels)
    num_samples = property(lambda self: self.objective.num_samples)
    model = property(lambda self: self.objective.model)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.strategy.apply(V)

    @property
    def exploits_symmetry(self) -> bool:
        """Whether :meth:`columns` with ``lower=True`` saves work (the closed-form chain)."""
        return self.strategy.exploits_symmetry

    def columns(self, j0: int, j1: int, lower: bool = False) -> torch.Tensor:
        """Columns ``j0:j1`` of the operator as a ``(p, j1 - j0)`` tensor (counted in
        ``num_matvecs``).

        Args:
            j0, j1: column range, ``0 <= j0 < j1 <= p``.
            lower: only the entries on and below the diagonal are needed (the caller fills the
                rest by symmetry); methods that exploit symmetry then leave the entries above it
                unspecified, the others ignore it.
        """
        fn = f"hbk.{self.name}.columns"
        check_int(fn, "j0", j0, 0)
        check_int(fn, "j1", j1, j0 + 1, self.dim)
        check_bool(fn, "lower", lower)
        out = self.strategy.columns(j0, j1, lower)
        if not bool(torch.isfinite(out).all()):
            fail(fn, "finite products", "NaN or inf entries (non-finite loss, parameters or data?)",
                 FloatingPointError, raw=True)
        self.num_matvecs += j1 - j0
        return out

    def loss(self) -> float:
        """The objective ``L`` (total or mean loss over all samples) at the current parameters."""
        return self.objective.value()

    def gradient(self) -> torch.Tensor:
        """``grad L`` as a ``(p,)`` tensor."""
        return self.objective.gradient()

    def release(self) -> None:
        """Free cached work (a kept first-order graph, a chain's activations)."""
        self.strategy.release()


class HessianOperator(CurvatureOperator):
    """The Hessian of the training objective as a linear operator: ``H @ v`` and ``H @ V``.

    Args:
        model: any ``nn.Module``; not modified (evaluated functionally). Active dropout and
            train-mode BatchNorm are refused unless ``check_deterministic=False``.
        loss_fn: the loss: an ``nn.Module`` loss (its ``reduction`` is read), a name
            ("cross_entropy", "nll", "mse", "bce_with_logits"), a torch functional, or a
            callable ``loss(outputs, targets) -> scalar`` (see :mod:`hbkernels.losses`).
        data: ``(X, y)``, a list or a ``DataLoader`` of tuple or dict batches (streamed per
            product; see :mod:`hbkernels.data`). The Hessian is of the total objective
            ``sum_b w_b loss_b`` (the mean over all samples for "mean", the sum for "sum").
        params: None (all trainable), an iterable of the model's parameters, or a predicate on
            parameter names (e.g. ``lambda n: n.startswith("fc1")``).
        method: "double_backward" (= "reverse_over_reverse"; the first-order graph is kept
            for one in-memory batch), "forward_over_reverse", "linear_chain" (closed forms for
            a :class:`~hbkernels.hvp.LinearChain`) or "auto": the chain when the model
            provides one that fits the data, else reverse-over-reverse.
        dtype: float32/float64 of the products (default: the model's); another dtype than the
            model's works on a cast copy.
        reduction: "mean"/"sum" for a callable loss (probed once when not given).
        forward: ``forward(model, batch) -> (outputs, targets)`` for models that need their
            own call.
        check_deterministic: refuse random models and data (two passes must agree).
        allow_shuffle: accept a shuffling DataLoader.
        cache: keep converted batches in memory (True/False/"auto").

    Attributes:
        dim: number of selected parameters ``p``; num_matvecs: products so far.
    """

    name = "HessianOperator"
    methods = HESSIAN_METHODS

    def _strategy(self, fn: str, method: str) -> HVPMethod:
        return hessian_method(fn, self.objective, method)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = sum_b J_b^T H_out,b J_b`` of the objective.

    ``J_b`` is the Jacobian of the model's outputs on batch ``b`` with respect to the selected
    parameters and ``H_out,b`` the Hessian of ``w_b loss_b`` with respect to the outputs. It is
    positive semi-definite for convex losses (CE, MSE, BCE) and equals the Hessian without the
    terms in the model's second derivatives.

    Args:
        method: "jvp_vjp" (any model: forward-mode ``J v``, ``H_out``, one VJP), "linear_chain"
            (closed forms for a :class:`~hbkernels.hvp.LinearChain`) or "auto" (the chain when
            the model provides one, else "jvp_vjp").
        model, loss_fn, data, params, dtype, reduction, forward, check_deterministic,
        allow_shuffle, cache: as for :class:`HessianOperator`.
    """

    name = "GGNOperator"
    methods = GGN_METHODS

    def _strategy(self, fn: str, method: str) -> HVPMethod:
        return ggn_method(fn, self.objective, method)


# ------------------------------------------------------------------------------ eigenpairs
def eigs(op: LinearOperator, k: int, which: str = "LA", tol: float = 1e-6,
         **lanczos_kwargs: Any) -> LanczosResult:
    """Eigenpairs of any operator by :func:`hbkernels.lanczos` (basis on the operator's device).

    Args:
        op: a :class:`~hbkernels.operators.LinearOperator`.
        k, which, tol, **lanczos_kwargs: as for :func:`hbkernels.lanczos`.

    Returns:
        :class:`LanczosResult`; ``extra`` records the operator, its product method, dtype,
        the dataset size and ``dim``.
    """
    if not isinstance(op, LinearOperator):
        fail("hbk.eigs", "a LinearOperator (HessianOperator, GGNOperator, MatrixOperator, ...)",
             op, TypeError)
    lanczos_kwargs.setdefault("device", op.device)
    res = lanczos(op.matvec, op.dim, k, which=which, tol=tol, **lanczos_kwargs)
    methods = getattr(op, "methods_used", None)
    res.extra = {"operator": op.name, "hvp_methods": dict(methods) if methods else {},
                 "hvp_dtype": str(op.dtype), "num_samples": getattr(op, "num_samples", None),
                 "dim": op.dim}
    return res


_OP_KEYS = ("reduction", "forward", "check_deterministic", "allow_shuffle", "cache")


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in kwargs.items() if k in _OP_KEYS},
            {k: v for k, v in kwargs.items() if k not in _OP_KEYS})


def hessian_eigs(model: nn.Module, loss_fn: Any, data: Any, k: int, which: str = "LA",
                 tol: float = 1e-6, params: Any = None, method: str = "auto",
                 hvp_dtype: torch.dtype | None = None, **kwargs: Any) -> LanczosResult:
    """Top-k (or bottom-k) eigenpairs of the loss Hessian.

    Args:
        model, loss_fn, data, params, method: as for :class:`HessianOperator`.
        k: number of eigenpairs.
        which: "LA", "SA" or "LM".
        tol: relative residual tolerance.
        hvp_dtype: dtype of the Hessian-vector products (HessianOperator's ``dtype``).
        **kwargs: HessianOperator's reduction, forward, check_deterministic, allow_shuffle,
            cache; the rest go to :func:`hbkernels.lanczos` (ncv, max_matvecs, v0, seed, dtype
            of the basis, block_size, quiet, ...).

    Returns:
        :class:`LanczosResult`; eigenvectors ``(p, k)`` as columns in ``model.parameters()``
        order (restricted to ``params``).
    """
    op_kw, lanczos_kw = _split_kwargs(kwargs)
    op = HessianOperator(model, loss_fn, data, params=params, method=method, dtype=hvp_dtype, **op_kw)
    return eigs(op, k, which=which, tol=tol, **lanczos_kw)


def ggn_eigs(model: nn.Module, loss_fn: Any, data: Any, k: int, which: str = "LA",
             tol: float = 1e-6, params: Any = None, method: str = "auto",
             hvp_dtype: torch.dtype | None = None, **kwargs: Any) -> LanczosResult:
    """Top-k eigenpairs of the generalised Gauss-Newton matrix (arguments as for
    :func:`hessian_eigs`, ``method`` as for :class:`GGNOperator`)."""
    op_kw, lanczos_kw = _split_kwargs(kwargs)
    op = GGNOperator(model, loss_fn, data, params=params, method=method, dtype=hvp_dtype, **op_kw)
    return eigs(op, k, which=which, tol=tol, **lanczos_kw)


# ------------------------------------------------------------------------------ exact matrices
def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _activation_numel(op: CurvatureOperator) -> int:
    """Elements of all module outputs in one forward over the largest batch."""
    obj = op.objective
    counts = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            counts[-1] += out.numel()

    handles = [m.register_forward_hook(hook) for m in obj.model.modules()]
    try:
        with torch.no_grad():
            for batch in obj.batches():
                counts.append(0)
                obj.outputs(obj.params, batch)
    finally:
        for h in handles:
            h.remove()
    return max(counts)


ASSEMBLIES = ("auto", "split", "columns")


def _assemble(fn: str, op: CurvatureOperator, memory_budget: int | None, quiet: bool,
              chunk_size: int | None, what: str, assembly: str = "columns") -> torch.Tensor:
    """The ``(p, p)`` matrix of ``op`` from column blocks within a memory budget.

    ``assembly``: "columns" (identity column blocks of ``op``), "split" (Hessian only: ``J^T D
    J`` plus the residual's cover columns, :mod:`hbkernels.hvp.split`) or "auto" (split where
    it applies and saves columns, unless the product method is the closed-form chain)."""
    p = op.dim
    elem = torch.finfo(op.dtype).bits // 8
    need = p * p * elem
    check_choice(fn, "assembly", assembly, ASSEMBLIES)
    if memory_budget is None:
        memory_budget = _available_bytes(op.device) // 2
    check_int(fn, "memory_budget", memory_budget, 0)
    if need > memory_budget:
        fail(fn, f"the {p} x {p} {what} ({need / 2**30:.2f} GiB in {op.dtype}) to fit in the memory "
             f"budget", f"a budget of {memory_budget / 2**30:.2f} GiB; use hbk.hessian_eigs for a "
             "few eigenpairs instead", raw=True)
    if chunk_size is not None:
        check_int(fn, "chunk_size", chunk_size, 1)
    check_bool(fn, "quiet", quiet)
    act = _activation_numel(op)
    plan = None
    if assembly == "split" or (assembly == "auto" and isinstance(op, HessianOperator)
                               and not op.exploits_symmetry):
        plan = _split_plan(fn, op, assembly, memory_budget - need, elem, act)
    M = torch.empty(p, p, dtype=op.dtype, device=op.device)
    try:
        if plan is not None and _assemble_split(op, M, plan, memory_budget - need, elem, act,
                                                quiet, chunk_size, fn, assembly):
            _symmetrize_(M)
            return M
        _assemble_columns(fn, op, M, memory_budget - need, elem, act, quiet, chunk_size)
    finally:
        op.release()
    (_mirror_lower_ if op.exploits_symmetry else _symmetrize_)(M)
    return M


def _split_plan(fn: str, op: CurvatureOperator, assembly: str, room: int, elem: int, act: int):
    """The split route's plan, or None (auto) / an error (split) where it does not apply."""
    from .hvp.split import split_plan

    if not isinstance(op, HessianOperator):
        fail(fn, "assembly='columns' or 'auto' for a Gauss-Newton matrix", "assembly='split'",
             raw=True)
    plan = split_plan(op.objective)
    if plan.reason is None and 2 * plan.jac_bytes > room:
        plan.reason = (f"a per-sample Jacobian of {plan.jac_bytes / 2**20:.0f} MiB (x2) over the "
                       f"{room / 2**20:.0f} MiB left in the memory budget")
    if plan.reason is None:
        return plan
    if assembly == "split":
        fail(fn, "a model and data the split assembly can take (samples independent, "
             "(inputs..., targets) batches, a residual cover of at most half the columns)",
             plan.reason, raw=True)
    return None


def _assemble_split(op: CurvatureOperator, M: torch.Tensor, plan, room: int, elem: int,
                    act: int, quiet: bool, chunk_size: int | None, fn: str, assembly: str) -> bool:
    """Fill ``M`` by the split route; False (``assembly="auto"``) when a later batch breaks the
    first batch's zero pattern of the residual, so the caller assembles by columns."""
    from .hvp.split import SplitPatternError, split_hessian

    obj = op.objective
    n = max(1, max(int(b.targets.shape[0]) for b in obj.batches()))
    C = max(1, plan.jac_bytes // max(1, n * obj.dim * elem))
    left = max(room - 2 * plan.jac_bytes, 0)
    per_sample = elem * C * (obj.dim + 4 * max(1, act // n))
    sample_chunk = int(max(1, min(n, 128, left // max(per_sample, 1))))
    per_col = elem * (4 * obj.dim + 4 * act)
    chunk = chunk_size if chunk_size is not None else int(max(1, min(64, left // per_col)))
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.columns * sum(1 for _ in obj.batches()), desc=fn, unit="col")
    try:
        col_chunk = int(max(1, min(obj.dim, 512, left // max(1, 4 * elem * n * C))))
        split_hessian(obj, M, plan, chunk, sample_chunk, col_chunk,
                      None if bar is None else bar.update)
    except SplitPatternError:
        if assembly == "split":
            raise
        _log.info("%s: split assembly refused on a later batch; assembling by columns", fn)
        return False
    finally:
        if bar is not None:
            bar.close()
    op.num_matvecs += plan.columns
    return True


def _assemble_columns(fn: str, op: CurvatureOperator, M: torch.Tensor, room: int, elem: int,
                      act: int, quiet: bool, chunk_size: int | None) -> None:
    p = op.dim
    if chunk_size is None:
        per_col = elem * (4 * p + 4 * act)
        chunk_size = int(max(1, min(p, 512, room // max(per_col, 1))))
    # Chunks never straddle two parameters (an identity chunk then stays in one layer).
    bounds = np.cumsum([0] + list(op.numels)).tolist()
    chunks = [(c0, min(c0 + chunk_size, b1)) for b0, b1 in itertools.pairwise(bounds)
              for c0 in range(b0, b1, chunk_size)]
    lower = op.exploits_symmetry
    if not quiet:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=fn, unit="chunk")
    for c0, c1 in chunks:
        if lower:
            M[c0:, c0:c1] = op.columns(c0, c1, lower=True)[c0:]
        else:
            M[:, c0:c1] = op.columns(c0, c1)


def exact_hessian(model: nn.Module, loss_fn: Any, data: Any, dtype: torch.dtype | None = None,
                  memory_budget: int | None = None, quiet: bool = True, params: Any = None,
                  method: str = "auto", chunk_size: int | None = None, assembly: str = "auto",
                  **kwargs: Any) -> torch.Tensor:
    """The exact ``(p, p)`` Hessian, assembled from block products.

    Column chunk ``[c0, c1)`` is one block product, never one backward pass per parameter.
    With the closed-form chain only the lower triangle is computed (the backward pass stops
    at each chunk's layer) and mirrored; otherwise the result is symmetrised,
    ``(H + H^T) / 2``, tile by tile.

    The split assembly (``assembly="split"``, chosen by "auto" where it applies) computes
    ``H = J^T D J + R`` instead: the Gauss-Newton part from per-sample output Jacobians in one
    GEMM, and of the residual ``R`` (the curvature of the outputs, weighted by the loss's
    output gradient) only the columns of the parameter tensors that cover its nonzero blocks
    (found by one product per tensor; in ReLU/max-pool networks its diagonal blocks are zero):
    544 columns instead of 5,187 on the digits CNN. See :mod:`hbkernels.hvp.split`.

    Args:
        model, loss_fn, data, params, method: as for :class:`HessianOperator`.
        dtype: float32 or float64 (default: the model's dtype).
        memory_budget: bytes allowed for the matrix plus the block products (default: half of
            the available memory of the device).
        quiet: no progress bar when True.
        chunk_size: columns per block product (default: from the budget, at most 512; 64 for
            the residual of the split assembly).
        assembly: "auto" (split where the samples are independent, the batches are
            ``(inputs..., targets)`` tensors and the residual cover is at most half the
            columns, unless the product method is the closed-form chain; else columns),
            "split" (refused where it does not apply) or "columns" (identity column blocks).
        **kwargs: HessianOperator's reduction, forward, check_deterministic, allow_shuffle, cache.

    Returns:
        ``(p, p)`` symmetric tensor in ``model.parameters()`` order.

    Raises:
        ValueError: if the p x p matrix does not fit in the budget.
    """
    op = HessianOperator(model, loss_fn, data, params=params, method=method, dtype=dtype, **kwargs)
    if assembly == "auto" and method != "auto":  # an explicit product method: its columns
        assembly = "columns"
    return _assemble("hbk.exact_hessian", op, memory_budget, quiet, chunk_size, "Hessian", assembly)


def exact_ggn(model: nn.Module, loss_fn: Any, data: Any, dtype: torch.dtype | None = None,
              memory_budget: int | None = None, quiet: bool = True, params: Any = None,
              method: str = "auto", chunk_size: int | None = None, **kwargs: Any) -> torch.Tensor:
    """The exact ``(p, p)`` generalised Gauss-Newton matrix (arguments as for
    :func:`exact_hessian`, ``method`` as for :class:`GGNOperator`)."""
    op = GGNOperator(model, loss_fn, data, params=params, method=method, dtype=dtype, **kwargs)
    return _assemble("hbk.exact_ggn", op, memory_budget, quiet, chunk_size, "Gauss-Newton matrix")


def _mirror_lower_(H: torch.Tensor, tile: int = 1024) -> None:
    """``H[i, j] <- H[j, i]`` for ``i < j`` (copy the lower triangle up), tile by tile."""
    p = H.shape[0]
    for i0 in range(0, p, tile):
        i1 = min(p, i0 + tile)
        d = H[i0:i1, i0:i1]
        d.copy_(torch.tril(d) + torch.tril(d, -1).t())
        for j0 in range(i1, p, tile):
            j1 = min(p, j0 + tile)
            H[i0:i1, j0:j1] = H[j0:j1, i0:i1].t()


def _symmetrize_(H: torch.Tensor, tile: int = 1024) -> None:
    """``H <- (H + H^T) / 2`` in place, one pair of tiles at a time (no p x p temporary)."""
    p = H.shape[0]
    for i0 in range(0, p, tile):
        i1 = min(p, i0 + tile)
        d = H[i0:i1, i0:i1]
        d.copy_((d + d.t()) * 0.5)
        for j0 in range(i1, p, tile):
            j1 = min(p, j0 + tile)
            m = (H[i0:i1, j0:j1] + H[j0:j1, i0:i1].t()) * 0.5
            H[i0:i1, j0:j1] = m
            H[j0:j1, i0:i1] = m.t()


def hessian_spectrum(model: nn.Module, loss_fn: Any, data: Any, dtype: torch.dtype = torch.float64,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Full spectrum of the exact Hessian.

    Args:
        model, loss_fn, data: as for :func:`exact_hessian`.
        dtype: dtype of the Hessian and of the eigensolver (float64 by default: a float32
            ``eigh`` of the paper's 10,703 x 10,703 Hessian once returned NaN).
        **kwargs: forwarded to :func:`exact_hessian` (params, memory_budget, quiet, ...).

    Returns:
        ``(eigenvalues (p,) descending, eigenvectors (p, p))``, eigenvector ``i`` is column
        ``i``, entries in ``model.parameters()`` order.

    Raises:
        FloatingPointError: if the eigensolver returns non-finite values twice (LAPACK
            ``syevd`` through torch, then scipy's ``syevr``).
    """
    H = exact_hessian(model, loss_fn, data, dtype=dtype, **kwargs)
    evals, evecs = torch.linalg.eigh(H)
    if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
        import scipy.linalg

        w, v = scipy.linalg.eigh(H.cpu().numpy(), driver="evr")
        evals, evecs = torch.from_numpy(w).to(H.device), torch.from_numpy(v).to(H.device)
        if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
            fail("hbk.hessian_spectrum", "finite eigenpairs", "NaN/inf from both torch.linalg.eigh "
                 "and scipy.linalg.eigh(driver='evr')", FloatingPointError, raw=True)
    return evals.flip(0), evecs.flip(1)
