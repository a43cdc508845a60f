"""The interface every HVP method implements, and the context all products run in.

A method is built from an :class:`~hbkernels.objective.Objective` and turns a block of
directions ``V`` of shape ``(p, b)`` into ``H V`` (or ``G V`` for the Gauss-Newton operators),
summed over the objective's batches with their weights. It may keep work between products
(a first-order graph, a chain's cached activations) and frees it in :meth:`release`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..objective import Objective

__all__ = ["HVPMethod", "identity_block", "math_attention", "output_hessian"]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run attention through the math SDPA backend and off the fused "fast path" of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode: the fused CPU
    kernels (flash, efficient, ``_native_multi_head_attention``) have no second derivative
    and no forward-mode rule; the math backend computes the same function with both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def identity_block(p: int, j0: int, j1: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``I[:, j0:j1]`` as a ``(p, j1 - j0)`` tensor."""
    E = torch.zeros(p, j1 - j0, dtype=dtype, device=device)
    E[torch.arange(j0, j1, device=device), torch.arange(j1 - j0, device=device)] = 1
    return E


class HVPMethod:
    """One way to compute curvature products of an objective.

    Attributes:
        name: the method's name (``HessianOperator(method=...)``).
        exploits_symmetry: whether :meth:`columns` with ``lower=True`` saves work.
    """

    name = "hvp"
    exploits_symmetry = False

    def __init__(self, objective: Objective) -> None:
        self.obj = objective

    def apply(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``H V`` for ``V`` of shape ``(p, b)`` in the objective's dtype and device."""
        raise NotImplementedError

    def columns(self, j0: int, j1: int, lower: bool = False) -> torch.Tensor:
        """``H[:, j0:j1]``; with ``lower`` only the rows ``i >= j`` of column ``j`` need be
        right (methods that exploit symmetry skip the rest)."""
        obj = self.obj
        return self.apply(identity_block(obj.dim, j0, j1, obj.dtype, obj.device))

    def release(self) -> None:
        """Free cached work (rebuilt on the next product if needed)."""


def output_hessian(obj: Objective, out: torch.Tensor, targets: torch.Tensor,
                   weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``R -> d^2 (weight * loss(out, targets)) / d out^2 R`` for directions ``R`` of shape
    ``(n, b, *out.shape[1:])``: the loss's closed form (:meth:`Loss.output_hessian`) where it
    has one, else a double backward through the small loss graph (built once here)."""
    closed = obj.loss.output_hessian(out, targets, weight)
    if closed is not None:
        return closed
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(obj.loss(o, targets) * weight, o, create_graph=True)[0]
    if not g.requires_grad:  # a loss linear in the outputs
        return torch.zeros_like

    def apply(R: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = torch.autograd.grad(g, o, grad_outputs=R.movedim(1, 0), retain_graph=True,
                                    is_grads_batched=True)[0]
        return h.movedim(0, 1)

    return apply
