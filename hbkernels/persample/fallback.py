"""Per-sample gradients of the parameters no factor rule covers, by ``torch.func``.

``vmap(grad(loss of one sample))`` with ``functional_call``, for those parameters only (the
others enter as constants), so any ``nn.Module`` works: custom parameterised layers, tied
weights, weights used functionally, cross-attention. It runs a vmap forward and backward of the
whole model (a fallback parameter may be used anywhere), so it costs about one vmap(grad) pass
whenever any parameter needs it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..losses import Loss
from .inputs import SampleInputs

__all__ = ["Fallback"]


class Fallback:
    """``torch.func`` per-sample gradients of the named parameters.

    Args:
        model: the model.
        names: names (``model.named_parameters()``) of the parameters to differentiate.
        inputs: the samples (their form and call).
        loss: the loss; each sample's is the loss of a batch of one.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: SampleInputs,
                 loss: Loss) -> None:
        self.model = model
        self.names = names
        self.inputs = inputs
        self.loss = loss
        self.call = _Call(model, inputs)

    def __call__(self, part: Any, targets: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample gradients ``(nb, numel)`` of each parameter for one block."""
        named = dict(self.model.named_parameters())
        theta = {nm: named[nm].detach() for nm in self.names}
        rest = {nm: p.detach() for nm, p in named.items() if nm not in theta}
        call, loss = self.call, self.loss

        def sample_loss(th, x, t):
            params = {"model." + nm: v for nm, v in {**rest, **th}.items()}
            out = functional_call(call, params, (SampleInputs.unsqueeze(x),))
            return loss(out, t.unsqueeze(0))

        # The math attention backend has vmap batching rules (the fused CPU kernels have none).
        with sdpa_kernel([SDPBackend.MATH]):
            g = vmap(grad(sample_loss), in_dims=(None, self.inputs.in_dims(), 0))(
                theta, part, targets)
        nb = targets.shape[0]
        return [g[nm].reshape(nb, -1) for nm in self.names]


class _Call(nn.Module):
    """The model and its call rule as one module, so that ``functional_call`` swaps the
    parameters wherever a user ``forward`` reaches them (submodules included)."""

    def __init__(self, model: nn.Module, inputs: SampleInputs) -> None:
        super().__init__()
        self.model = model
        self._inputs = inputs

    def forward(self, part: Any) -> Any:
        return self._inputs.call(self.model, part)
