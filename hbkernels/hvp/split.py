"""The exact Hessian as Gauss-Newton part plus residual: ``H = J^T D J + R``.

For a batch with outputs ``f(theta)`` (``n`` samples, ``C`` outputs each) and loss ``w l(f)``:

* ``G = J^T D J`` with ``J`` the ``(n C, p)`` per-sample output Jacobian (``torch.func``:
  ``vmap`` over samples of ``jacrev``, a few backward passes batched over samples) and ``D``
  the loss's output Hessian; one GEMM into the preallocated ``(p, p)`` buffer;
* ``R = sum_i sum_c r_ic d^2 f_ic / dtheta^2`` with ``r = d(w l)/df`` held fixed: the Hessian of
  ``phi(theta) = <r, f(theta)>``. In networks that are piecewise linear in each parameter
  tensor (Linear and convolution layers with ReLU, max/average pooling, flatten), ``R`` has
  zero diagonal blocks and zero rows for the last layer's bias: one random product per
  parameter tensor finds its zero blocks (the double backward returns exact zeros there),
  and only the columns of a minimum-size set of tensors covering the nonzero blocks are
  computed (products of ``phi``); the rest follows by symmetry.

On the digits CNN (p = 5,187, n = 537) this is 544 columns instead of 5,187. The result is
the same Hessian as the identity-column route (tested against autograd), assembled without
any p x p temporary. :func:`split_plan` says whether the route applies (samples independent,
``(X, y)``-style batches, no custom ``forward``) and saves work.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap
from torch.overrides import TorchFunctionMode

from ..data import Batch
from ..objective import Objective
from .base import math_attention, output_hessian

__all__ = ["SplitPlan", "split_hessian", "split_plan"]


class SplitPatternError(RuntimeError):
    """A later batch has a nonzero residual block the first batch's probe called zero."""


@dataclass
class SplitPlan:
    """What :func:`split_hessian` will do.

    Attributes:
        cover: indices of the parameter tensors whose columns of ``R`` are computed.
        columns: number of residual columns (sum of the cover's sizes).
        rows: for each cover tensor, the tensors whose rows its products compute (its nonzero
            blocks outside the cover, and the blocks with later cover tensors); a product
            differentiates only with respect to those.
        jac_bytes: bytes of one batch's per-sample Jacobian (the largest batch).
        reason: why the route does not apply (None: it does).
    """

    cover: list[int]
    columns: int
    jac_bytes: int
    reason: str | None = None
    rows: dict[int, list[int]] | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = {t: [] for t in self.cover}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _gemm_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` as one GEMM over unfolded patches (same function; ``groups=1``)."""
    n, _, H, W = x.shape
    cout, _, kh, kw = w.shape
    st, pd, dl = _pair(stride), _pair(padding), _pair(dilation)
    ho = (H + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
    wo = (W + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
    U = F.unfold(x, (kh, kw), dl, pd, st)  # (n, K, L)
    K, L = U.shape[1], U.shape[2]
    out = U.transpose(1, 2).reshape(n * L, K) @ w.reshape(cout, K).t()
    if b is not None:
        out = out + b
    return out.view(n, L, cout).transpose(1, 2).reshape(n, cout, ho, wo)


class _GemmConv(TorchFunctionMode):
    """Route ``conv2d`` (4-D input, ``groups=1``, numeric padding) through :func:`_gemm_conv2d`:
    CPU float64 convolutions and their double backward otherwise take ATen's slow path
    (``_slow_conv2d_*``, no MKL-DNN); as GEMMs the residual products cost about half."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = dict(zip(names, args), **kwargs)
            if (a.get("groups", 1) == 1 and not isinstance(a.get("padding", 0), str)
                    and a["input"].dim() == 4):
                return _gemm_conv2d(a["input"], a["weight"], a.get("bias"), a.get("stride", 1),
                                    a.get("padding", 0), a.get("dilation", 1))
        return func(*args, **kwargs)


@contextlib.contextmanager
def gemm_convolutions(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """:class:`_GemmConv` for float64 on CPU (where it pays), else nothing."""
    if dtype == torch.float64 and device.type == "cpu":
        with _GemmConv():
            yield
    else:
        yield


def _inputs(batch: Batch) -> tuple[torch.Tensor, ...] | None:
    """The batch's positional tensor inputs with one row per sample, else None."""
    xs = batch.inputs
    t = batch.targets
    if not isinstance(xs, tuple) or not xs or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    n = t.shape[0]
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n for x in xs):
        return None
    return xs


def _sample_outputs(obj: Objective):
    """``f(params, *x_i) -> out_i``: one sample's outputs (a batch of one, squeezed)."""

    def f(pd: dict, *xs: torch.Tensor) -> torch.Tensor:
        b = Batch(raw=None, inputs=tuple(x[None] for x in xs), targets=None)
        return obj.outputs(pd, b)[0][0]

    return f


def jacobian(obj: Objective, batch: Batch, chunk: int) -> torch.Tensor:
    """``(n, C, p)`` per-sample Jacobian of the outputs (``C`` = outputs per sample), computed
    ``chunk`` samples at a time into one preallocated tensor."""
    xs = _inputs(batch)
    f = _sample_outputs(obj)
    jac = vmap(jacrev(f), in_dims=(None,) + (0,) * len(xs))
    n = xs[0].shape[0]
    J = None
    with math_attention():
        for s in range(0, n, chunk):
            part = jac(obj.params, *(x[s:s + chunk] for x in xs))
            rows = torch.cat([part[k].reshape(part[k].shape[0], -1, obj.numels[i])
                              for i, k in enumerate(obj.names)], dim=2)
            if J is None:
                J = torch.empty(n, rows.shape[1], obj.dim, dtype=obj.dtype, device=obj.device)
            J[s:s + chunk] = rows
            del part, rows
    return J


def _independent(obj: Objective, batch: Batch, out: torch.Tensor) -> bool:
    """Whether each sample's outputs, computed as a batch of one, are the batch's outputs."""
    xs = _inputs(batch)
    with torch.no_grad(), math_attention():
        try:
            single = vmap(_sample_outputs(obj), in_dims=(None,) + (0,) * len(xs))(obj.params, *xs)
        except (RuntimeError, ValueError, TypeError):  # a model vmap cannot run
            return False
    if single.shape != out.shape:
        return False
    tol = 1e-4 if obj.dtype == torch.float32 else 1e-10
    scale = float(out.abs().max()) if out.numel() else 0.0
    return bool(((single - out).abs() <= tol * max(scale, 1.0)).all())


class _Residual:
    """The first-order graph of ``phi = <r, f(theta)>`` for one batch, and its products."""

    def __init__(self, obj: Objective, batch: Batch) -> None:
        self.obj = obj
        self.params = [t.detach().requires_grad_(True) for t in obj.params.values()]
        pd = dict(zip(obj.names, self.params))
        with torch.enable_grad(), math_attention(), gemm_convolutions(obj.dtype, obj.device):
            out, targets = obj.outputs(pd, batch)
            o = out.detach().requires_grad_(True)
            r = torch.autograd.grad(obj.loss(o, targets) * obj.weight(targets), o)[0]
            phi = (out * r).sum()
            self.grads = torch.autograd.grad(phi, self.params, create_graph=True,
                                             allow_unused=True)
        self.out = out.detach()
        self.targets = targets

    def live(self, t: int) -> bool:
        g = self.grads[t]
        return g is not None and g.requires_grad

    def product(self, t: int, V: torch.Tensor,
                rows: list[int] | None = None) -> list[torch.Tensor | None]:
        """``R[rows, tensor t] V`` per parameter tensor (all tensors when ``rows`` is None) for
        ``V`` of shape ``(b, *shape_t)``; None where not computed or an exact zero block."""
        rows = list(range(len(self.params))) if rows is None else rows
        if not rows:
            return [None] * len(self.params)
        # One backward per direction: batched double backward (is_grads_batched) is slower per
        # vector on CPU here, and its vmap cannot run the GEMM convolutions' col2im.
        inputs = [self.params[s] for s in rows]
        with torch.enable_grad(), math_attention():
            each = [torch.autograd.grad(self.grads[t], inputs, grad_outputs=v, retain_graph=True,
                                        allow_unused=True) for v in V]
        res = [None if each[0][i] is None else torch.stack([e[i] for e in each])
               for i in range(len(rows))]
        out: list[torch.Tensor | None] = [None] * len(self.params)
        for s, r in zip(rows, res):
            out[s] = r
        return out


def _nonzero(x: torch.Tensor | None) -> bool:
    return x is not None and bool((x != 0).any())


def _min_cover(numels: list[int], forced: set[int], edges: set[tuple[int, int]]) -> list[int]:
    """A minimum-weight vertex cover of ``edges`` containing ``forced`` (exhaustive over the
    free vertices when there are at most 16, else greedy by weight per covered edge)."""
    rest = {e for e in edges if e[0] not in forced and e[1] not in forced}
    free = sorted({v for e in rest for v in e})
    if not rest:
        return sorted(forced)
    if len(free) <= 16:
        best, best_w = None, None
        for k in range(1, len(free) + 1):
            for sub in itertools.combinations(free, k):
                s = set(sub)
                if all(a in s or b in s for a, b in rest):
                    w = sum(numels[v] for v in s)
                    if best_w is None or w < best_w:
                        best, best_w = s, w
        return sorted(forced | best)
    cover = set(forced)
    while rest:
        v = min(free, key=lambda u: numels[u] / max(1, sum(u in e for e in rest)))
        cover.add(v)
        rest = {e for e in rest if v not in e}
        free = sorted({u for e in rest for u in e})
    return sorted(cover)


def split_plan(obj: Objective, seed: int = 0) -> SplitPlan:
    """Probe the residual's zero blocks and choose the cover (one product per tensor on the
    first batch; the cover is checked again on every batch by :func:`split_hessian`)."""
    p, T = obj.dim, len(obj.names)
    sizes, jac = [], 0
    for batch in obj.batches():
        xs = _inputs(batch)
        if obj.call.user_forward is not None or xs is None:
            return SplitPlan([], 0, 0, "batches other than (inputs..., targets) tensors, or a "
                             "custom forward=")
        sizes.append(xs[0].shape[0])
    first = obj.data.first()
    res = _Residual(obj, first)
    if not _independent(obj, first, res.out):
        return SplitPlan([], 0, 0, "outputs that mix samples (a sample's outputs differ as a "
                         "batch of one)")
    C = res.out[0].numel()
    jac = max(sizes) * C * p * torch.finfo(obj.dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(seed)
    forced: set[int] = set()
    edges: set[tuple[int, int]] = set()
    shapes = obj.shapes
    for t in range(T):
        if not res.live(t):
            continue
        v = torch.randn(1, *shapes[t], generator=gen, dtype=torch.float64).to(obj.dtype)
        for s, block in enumerate(res.product(t, v.to(obj.device))):
            if _nonzero(block):
                if s == t:
                    forced.add(t)
                else:
                    edges.add((min(s, t), max(s, t)))
    del res
    cover = _min_cover(list(obj.numels), forced, edges)
    cols = sum(obj.numels[t] for t in cover)
    if cols > p // 2:
        return SplitPlan(cover, cols, jac, f"a residual cover of {cols} of {p} columns")
    rows = {}
    for t in cover:
        nb = {s for e in edges if t in e for s in e if s != t} | ({t} if t in forced else set())
        rows[t] = sorted(s for s in nb if s not in cover or s >= t)
    return SplitPlan(cover, cols, jac, rows=rows)


def _ranges(obj: Objective) -> list[tuple[int, int]]:
    off = [0, *itertools.accumulate(obj.numels)]
    return list(itertools.pairwise(off))


def split_hessian(obj: Objective, M: torch.Tensor, plan: SplitPlan, chunk: int,
                  sample_chunk: int, col_chunk: int = 512, progress=None) -> None:
    """Fill ``M`` (``(p, p)``, preallocated) with ``H = J^T D J + R`` (not yet symmetrised).

    Args:
        obj: the objective.
        M: the output buffer, overwritten.
        plan: from :func:`split_plan` (``reason`` None).
        chunk: residual columns per batched product.
        sample_chunk: samples per ``vmap(jacrev)`` call.
        col_chunk: columns of ``D J`` formed at a time for the Gauss-Newton GEMM.
        progress: optional callable ``(columns_done)`` after each block (a progress bar).
    """
    rngs = _ranges(obj)
    cover = set(plan.cover)
    outside = [rngs[t] for t in range(len(rngs)) if t not in cover]
    M.zero_()
    for batch in obj.batches():
        # Gauss-Newton part: one GEMM per batch.
        res = _Residual(obj, batch)
        if not _independent(obj, batch, res.out):
            from ..checks import fail

            fail(obj.fn, "outputs that do not mix samples on every batch", "a batch whose "
                 "outputs differ per sample; pass assembly='columns'", RuntimeError, raw=True)
        J = jacobian(obj, batch, sample_chunk)  # (n, C, p)
        n, C, p = J.shape
        D = output_hessian(obj, res.out, res.targets, obj.weight(res.targets))
        Jr = J.view(n * C, p)
        Jt = J.permute(0, 2, 1)  # (n, p, C): the Jacobian's columns as output directions
        for c0 in range(0, p, col_chunk):  # D J a block of columns at a time (no n C p copy)
            c1 = min(p, c0 + col_chunk)
            DJ = D(Jt[:, c0:c1].reshape(n, c1 - c0, *res.out.shape[1:])).reshape(n, c1 - c0, C)
            M[:, c0:c1].addmm_(Jr.t(), DJ.transpose(1, 2).reshape(n * C, c1 - c0))
        del J, Jr, Jt, DJ
        # Residual: columns of the cover; blocks outside it are exact zeros (checked below).
        for t in range(len(rngs)):
            a, b = rngs[t]
            if t not in cover:
                continue
            need = plan.rows[t]
            if not res.live(t) or not need:
                if progress is not None:
                    progress(b - a)
                continue
            for c0 in range(a, b, chunk):
                c1 = min(b, c0 + chunk)
                E = torch.zeros(c1 - c0, b - a, dtype=obj.dtype, device=obj.device)
                E[torch.arange(c1 - c0), torch.arange(c0 - a, c1 - a)] = 1
                blocks = res.product(t, E.reshape(c1 - c0, *obj.shapes[t]), need)
                for s, blk in enumerate(blocks):
                    if blk is None:
                        continue
                    rows = blk.reshape(c1 - c0, -1)  # (b, numel_s): R[rows of s, c0:c1]^T
                    r0, r1 = rngs[s]
                    M[r0:r1, c0:c1] += rows.t()
                    if s != t:  # the mirror block: each pair is computed from one side only
                        M[c0:c1, r0:r1] += rows
                if progress is not None:
                    progress(c1 - c0)
        _check_outside(obj, res, cover, outside)
        del res


def _check_outside(obj: Objective, res: _Residual, cover: set[int],
                   outside: list[tuple[int, int]]) -> None:
    """Every block of ``R`` between two tensors outside the cover is zero on this batch too
    (one random product per such tensor); else the route would be silently wrong."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    for t in range(len(obj.names)):
        if t in cover or not res.live(t):
            continue
        v = torch.randn(1, *obj.shapes[t], generator=gen, dtype=torch.float64).to(obj.dtype)
        for s, blk in enumerate(res.product(t, v.to(obj.device))):
            if s not in cover and _nonzero(blk):
                from ..checks import fail

                fail(obj.fn, "a residual whose zero blocks are the same on every batch",
                     f"a nonzero block between {obj.names[s]} and {obj.names[t]} on a later "
                     "batch; pass assembly='columns'", SplitPatternError, raw=True)
