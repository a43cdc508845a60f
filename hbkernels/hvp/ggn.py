"""Generalised Gauss-Newton products ``G v = J^T H_out J v`` through JVP and VJP (torch.func).

Per batch: ``J v`` by forward mode (vmapped over the block), ``H_out`` of the weighted batch
loss in output space (:func:`~hbkernels.hvp.base.output_hessian`: a closed form or autograd on
the small output graph), ``J^T`` by one VJP (vmapped). Nothing is kept between products.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from .base import HVPMethod, math_attention, output_hessian

__all__ = ["JacobianGGN"]


class JacobianGGN(HVPMethod):
    """``G V`` for any model, from Jacobian-vector and vector-Jacobian products."""

    name = "jvp_vjp"

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        obj = self.obj
        rows = V.t()
        b = rows.shape[0]
        tangents = obj.split(rows)
        total = None
        for batch in obj.batches():
            def f(p: dict, batch=batch) -> torch.Tensor:
                return obj.outputs(p, batch)[0]

            def f_aux(p: dict, batch=batch) -> tuple[torch.Tensor, torch.Tensor]:
                return obj.outputs(p, batch)

            with math_attention():
                out, vjp_fn, targets = vjp(f_aux, obj.params, has_aux=True)
                Jv = vmap(lambda t: jvp(f, (obj.params,), (t,))[1])(tangents)  # (b, *out.shape)
                HJv = output_hessian(obj, out.detach(), targets, obj.weight(targets))(Jv.movedim(0, 1))
                res = vmap(vjp_fn)(HJv.movedim(1, 0).contiguous())[0]
            out_rows = obj.join([res[n] for n in obj.names], b)
            total = out_rows if total is None else total.add_(out_rows)
        return total.t()
