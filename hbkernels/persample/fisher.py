"""The empirical Fisher ``F = G^T G / n`` (mean loss) or ``G^T G`` (sum) as an operator.

``G`` (n, p) holds the per-sample gradients of each sample's own loss at its true target.
``F V = G^T (G V)`` comes from the factors: ``G V`` by the ghost dots (or the materialised
pairs' columns), ``G^T U`` by the factored outer products; ``G`` is never formed. The compact
factors of all n samples are captured once when they fit the memory budget; otherwise every
product recaptures the sample blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from .. import ops
from ..checks import fail
from ..lanczos import LanczosResult, lanczos
from ..operators import LinearOperator
from .engine import Engine, Factors
from .options import PerSampleOptions, parse_options
from .planning import Work
from .products import Store, add_gtu

__all__ = ["EmpiricalFisherOperator", "fisher_eigs"]


def _split_data(fn: str, data: Any) -> tuple[Any, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], torch.Tensor)):
        fail(fn, "data to be (inputs, targets) (inputs: a tensor, tuple or dict of tensors with "
             "one row per sample)", data, TypeError)
    return data[0], data[1]


class EmpiricalFisherOperator(LinearOperator):
    """``F v = G^T G v / n`` (``reduction="mean"``) or ``G^T G v`` (``"sum"``), from factors.

    Args:
        model: any ``nn.Module`` (layers without a factor rule use torch.func).
        loss: a registry name, an ``nn.Module`` loss (its ``reduction`` is read) or a callable
            (``reduction=`` stated or probed once).
        data: ``(inputs, targets)``; inputs a tensor, tuple or dict of tensors with n rows.
        **options: ``forward``, ``reduction``, ``memory_budget``, ``block_size``, ``strategy``,
            ``quiet``, ``check_deterministic`` as in :func:`hbkernels.per_sample_grads`.

    Attributes:
        num_samples: ``n``; reduction: "mean" or "sum".
    """

    name = "EmpiricalFisherOperator"

    def __init__(self, model: nn.Module, loss: Any, data: Any,
                 **options: Unpack[PerSampleOptions]) -> None:
        fn = "hbk.EmpiricalFisherOperator"
        for bad in ("labels", "targets"):
            if bad in options:
                fail(fn, "the targets inside data=(inputs, targets)", f"{bad}=", TypeError,
                     raw=True)
        inputs, targets = _split_data(fn, data)
        opts = parse_options(fn, dict(options, loss=loss, labels="true", targets=targets))
        eng = Engine(fn, model, inputs, opts, Work(gtu=1), scale=False)
        if opts.loss.reduction is None:
            m = min(eng.n, 2)
            opts.loss = opts.loss.resolved(fn, lambda: self._probe(eng, m))
            eng.loss = opts.loss
        super().__init__(eng.p, eng.dtype, eng.device)
        self.engine = eng
        self.reduction = opts.loss.reduction
        self.num_samples = eng.n
        self._store: Store | None = None
        if Store.nbytes(eng) <= opts.memory_budget:
            self._store = Store.empty(eng)
            for s, e in eng.blocks():
                f = eng.capture(s, e)
                self._store.put(s, e, f, eng.dense(f) if eng.layout.width else None)

    @staticmethod
    def _probe(eng: Engine, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = eng.inputs.call(eng.model, eng.inputs.slice(0, m))
        return out, eng.given[:m]

    def _gv(self, f: Factors | Store, dense: torch.Tensor | None, V: torch.Tensor,
            nb: int) -> torch.Tensor:
        eng = self.engine
        idx = eng.ghost_index()
        b = V.shape[1]
        if idx:
            qs = [eng.pairs[j] for j in idx]
            A = [f.A[j][:, 0] if eng.pairs[j].T == 1 else f.A[j] for j in idx]
            D = [f.D[j][:, 0] if eng.pairs[j].T == 1 else f.D[j] for j in idx]
            W = [V[q.w_offset : q.w_offset + q.p_weight].view(q.d_out, q.d_in, b) for q in qs]
            Wb = [V[q.b_offset : q.b_offset + q.d_out] if q.has_bias else None for q in qs]
            out = ops.ghost_dots(A, D, W, Wb)
        else:
            out = torch.zeros(nb, b, dtype=self.dtype, device=self.device)
        if dense is not None and dense.shape[1]:
            for col, p0, size in eng.layout.runs:
                out.addmm_(dense[:, col : col + size], V[p0 : p0 + size])
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        eng = self.engine
        V = V.contiguous()
        out = torch.zeros(self.dim, V.shape[1], dtype=self.dtype, device=self.device)
        if self._store is not None:
            st = self._store
            add_gtu(eng, st, st.dense, self._gv(st, st.dense, V, eng.n), out)
        else:
            for s, e in eng.blocks():
                f = eng.capture(s, e)
                dense = eng.dense(f) if eng.layout.width else None
                add_gtu(eng, f, dense, self._gv(f, dense, V, f.n), out)
        if self.reduction == "mean":
            out.div_(self.num_samples)
        return out


def fisher_eigs(model: nn.Module, loss: Any, data: Any, k: int, which: str = "LA",
                tol: float = 1e-6, *, options: PerSampleOptions | None = None,
                **lanczos_kwargs: Any) -> LanczosResult:
    """Top-k eigenpairs of the empirical Fisher by :func:`hbkernels.lanczos`.

    Args:
        model, loss, data: as for :class:`EmpiricalFisherOperator`.
        k: number of eigenpairs.
        which: "LA" (largest), "SA" or "LM".
        tol: relative residual tolerance.
        options: the operator's options (``forward``, ``memory_budget``, ...).
        **lanczos_kwargs: forwarded to :func:`hbkernels.lanczos` (ncv, max_matvecs, seed, ...).

    Returns:
        :class:`~hbkernels.LanczosResult`; eigenvectors ``(p, k)`` in ``model.parameters()``
        order. ``extra`` records the reduction and the number of samples.
    """
    op = EmpiricalFisherOperator(model, loss, data, **(options or {}))
    lanczos_kwargs.setdefault("device", op.device)
    res = lanczos(op.matvec, op.dim, k, which=which, tol=tol, **lanczos_kwargs)
    res.extra.update(operator="empirical_fisher", reduction=op.reduction,
                     num_samples=op.num_samples)
    return res
