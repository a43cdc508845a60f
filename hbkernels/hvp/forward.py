"""Forward-over-reverse HVPs: ``H v = jvp(grad L, v)`` with torch.func, vmapped over blocks.

Each product evaluates the model functionally per batch; nothing is kept between products.
Floating targets enter the differentiated function with a materialised zero tangent: some
backward formulas (``mse_loss`` with mean reduction) write in place into the tangent of an
input that has none, which torch represents by an immutable ZeroTensor ("ZeroTensors are
immutable").
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vmap

from ..data import Batch
from .base import HVPMethod, math_attention

__all__ = ["ForwardOverReverse"]


class ForwardOverReverse(HVPMethod):
    """``H V`` by forward-mode differentiation of the reverse-mode gradient."""

    name = "forward_over_reverse"

    def _batch_hvp(self, batch: Batch, tangents: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        obj = self.obj

        def loss(p: dict, shift: torch.Tensor) -> torch.Tensor:
            out, targets = obj.outputs(p, batch)
            if targets.is_floating_point():
                targets = targets + shift  # shift is 0 with a real (materialised) zero tangent
            return obj.loss(out, targets) * obj.weight(targets)

        g = grad(loss)
        zero = torch.zeros((), dtype=obj.dtype, device=obj.device)
        zero_t = torch.zeros((), dtype=obj.dtype, device=obj.device)

        def hvp(t: dict) -> dict:
            return jvp(g, (obj.params, zero), (t, zero_t))[1]

        with math_attention():
            out = hvp({n: t[0] for n, t in tangents.items()}) if b == 1 else vmap(hvp)(tangents)
        return obj.join([out[n] for n in obj.names], b)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.t()
        b = rows.shape[0]
        tangents = self.obj.split(rows)
        total = None
        for batch in self.obj.batches():
            out = self._batch_hvp(batch, tangents, b)
            total = out if total is None else total.add_(out)
        return total.t()
