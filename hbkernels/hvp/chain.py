"""The ``LinearChain`` description: a model that is ``Linear (act Linear)*`` on its inputs.

Any module can describe itself as such a chain by a ``linear_chain()`` method returning a
:class:`LinearChain` (the paper's MLPs do); an ``nn.Sequential`` of ``[Flatten,] Linear, act,
Linear, ..., Linear`` with act in ReLU/Tanh/Sigmoid is recognised as one. The closed-form
products of :mod:`hbkernels.hvp.chain_hvp` use it; the core never needs to know the class.
A chain is only accepted when it owns every parameter of the model and the model has no
buffers and no hooks, and the products check on the first batch that the chain computes the
model's outputs. Convolutional nets (Conv2d, pooling, flatten) have their own description,
:class:`~hbkernels.hvp.conv_chain.ConvChain`, with the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import fail

__all__ = ["CHAIN_ACTIVATIONS", "LinearChain", "activation_derivatives", "find_chain"]

CHAIN_ACTIVATIONS = ("relu", "tanh", "sigmoid")
_ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class LinearChain:
    """``z_0 = x`` (flattened to ``(n, in_features)`` when ``flatten``), ``z_{l+1} =
    act_l(layers[l](z_l))`` and the last layer without activation.

    Attributes:
        layers: the ``nn.Linear`` layers in forward order.
        activations: one name of :data:`CHAIN_ACTIVATIONS` between consecutive layers
            (``len(layers) - 1``).
        flatten: inputs of any shape ``(n, *shape)`` are flattened; otherwise they must be 2-D.
    """

    layers: tuple[nn.Linear, ...]
    activations: tuple[str, ...]
    flatten: bool = True

    def __post_init__(self) -> None:
        fn = "hbk.LinearChain"
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "activations", tuple(self.activations))
        if not self.layers or not all(type(m) is nn.Linear for m in self.layers):
            fail(fn, "layers to be a non-empty sequence of nn.Linear",
                 [type(m).__name__ for m in self.layers], TypeError, raw=True)
        if len(self.activations) != len(self.layers) - 1 or \
                any(a not in CHAIN_ACTIVATIONS for a in self.activations):
            fail(fn, f"{len(self.layers) - 1} activations from {CHAIN_ACTIVATIONS}",
                 list(self.activations), raw=True)
        for a, b in zip(self.layers[:-1], self.layers[1:]):
            if a.out_features != b.in_features:
                fail(fn, "consecutive layers with matching sizes",
                     f"{a.out_features} -> {b.in_features}", raw=True)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The chain's function (used to check a description against its model)."""
        h = x.reshape(x.shape[0], -1) if self.flatten else x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.activations):
                h = getattr(torch, self.activations[i])(h)
        return h


def _from_sequential(model: nn.Sequential) -> LinearChain | None:
    mods = list(model)
    flatten = bool(mods) and type(mods[0]) is nn.Flatten and mods[0].start_dim == 1 \
        and mods[0].end_dim == -1
    if flatten:
        mods = mods[1:]
    if not mods or len(mods) % 2 == 0:
        return None
    layers, acts = mods[0::2], [_ACT_MODULES.get(type(m)) for m in mods[1::2]]
    if any(type(m) is not nn.Linear for m in layers) or None in acts:
        return None
    return LinearChain(tuple(layers), tuple(acts), flatten)


def find_chain(model: nn.Module, fn: str = "hbk.HessianOperator") -> LinearChain | None:
    """The model's :class:`LinearChain`, or None when it is not (or does not say it is) one."""
    describe = getattr(model, "linear_chain", None)
    if callable(describe):
        spec = describe()
        if spec is not None and not isinstance(spec, LinearChain):
            fail(fn, f"{type(model).__name__}.linear_chain() to return a "
                 "LinearChain or None", spec, TypeError)
    elif type(model) is nn.Sequential:
        spec = _from_sequential(model)
    else:
        spec = None
    return spec if spec is not None and chain_covers_model(model, spec.layers) else None


def chain_covers_model(model: nn.Module, layers) -> bool:
    """Whether a chain of ``layers`` computes all of ``model``: it owns every parameter, and the
    model has no buffers and no forward hooks (which a closed form would skip)."""
    owned = {id(p) for layer in layers for p in layer.parameters()}
    if owned != {id(p) for p in model.parameters()} or list(model.buffers()):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def activation_derivatives(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma(z), sigma'(z), sigma''(z))`` elementwise."""
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype), torch.zeros((), dtype=z.dtype, device=z.device)
    if name == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)
