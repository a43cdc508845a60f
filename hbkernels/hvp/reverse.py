"""Reverse-over-reverse HVPs: ``H v = d/dtheta <grad L, v>`` by a second backward pass.

When the data is one in-memory batch the first-order graph (``grad L`` with
``create_graph=True``) is built once and every product is one backward pass through it;
otherwise each product rebuilds it batch by batch (streamed data is never held). A block of
``b`` directions is one batched backward (``is_grads_batched``).
"""

from __future__ import annotations

import torch

from ..data import Batch
from .base import HVPMethod, math_attention

__all__ = ["ReverseOverReverse"]


class ReverseOverReverse(HVPMethod):
    """``H V`` by double backward, with the first-order graph kept for one in-memory batch."""

    name = "double_backward"

    def __init__(self, objective) -> None:
        super().__init__(objective)
        self._graph: tuple[list[torch.Tensor], tuple] | None = None
        batches = list(objective.batches()) if objective.data.in_memory else []
        self._single = batches[0] if len(batches) == 1 else None

    def _build(self, batch: Batch) -> tuple[list[torch.Tensor], tuple]:
        params = {n: t.detach().requires_grad_(True) for n, t in self.obj.params.items()}
        with torch.enable_grad(), math_attention():
            loss = self.obj.batch_loss(params, batch)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                        allow_unused=True)
        return list(params.values()), grads

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.t()
        if self._single is not None:
            if self._graph is None:
                self._graph = self._build(self._single)
            return self._backward(*self._graph, rows, retain=True).t()
        total = None
        for batch in self.obj.batches():
            out = self._backward(*self._build(batch), rows, retain=False)
            total = out if total is None else total.add_(out)
        return total.t()

    def _backward(self, params: list[torch.Tensor], grads: tuple, rows: torch.Tensor,
                  retain: bool) -> torch.Tensor:
        """``(b, p)`` rows of ``H V`` from one first-order graph."""
        b = rows.shape[0]
        vs = list(self.obj.split(rows).values())
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the gradient does not depend on the parameters: H = 0
            return torch.zeros_like(rows)
        with torch.enable_grad(), math_attention():
            res = torch.autograd.grad([grads[i] for i in live], params,
                                      grad_outputs=[vs[i][0] if b == 1 else vs[i] for i in live],
                                      retain_graph=retain, allow_unused=True,
                                      is_grads_batched=b > 1)
        lead = () if b == 1 else (b,)
        res = [torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device) if r is None else r
               for r, p in zip(res, params)]
        return self.obj.join(res, b)

    def release(self) -> None:
        self._graph = None
