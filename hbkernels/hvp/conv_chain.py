"""The ``ConvChain`` description: a model that is a plain sequence of convolutional-net layers.

Supported layers: ``nn.Conv2d`` (any stride and zero padding given as ints; dilation 1,
groups 1), ``nn.MaxPool2d`` (any kernel, stride, padding, dilation, ``ceil_mode``),
``nn.AvgPool2d``, ``nn.Flatten`` (``start_dim=1, end_dim=-1``), ``nn.ReLU``/``nn.Tanh``/
``nn.Sigmoid`` and ``nn.Linear`` on 2-D inputs. A module opts in with a ``conv_chain()``
method returning a :class:`ConvChain` (the paper's CNN and LeNet-5 do); a plain
``nn.Sequential`` of those layers is recognised by structure. As for
:class:`~hbkernels.hvp.chain.LinearChain`, a chain is only used when it owns every parameter,
the model has no buffers and no hooks, and the products check on the first batch that the chain
computes the model's outputs. The closed-form products are in
:mod:`hbkernels.hvp.conv_chain_hvp`; :func:`conv_chain_refusal` says why a module is not one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import fail
from .chain import chain_covers_model

__all__ = ["CONV_CHAIN_LAYERS", "ConvChain", "conv_chain_refusal", "find_conv_chain"]

_ACTS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
CONV_CHAIN_LAYERS = ("Conv2d", "Linear", "ReLU", "Tanh", "Sigmoid", "MaxPool2d", "AvgPool2d",
                     "Flatten")


def _layer_refusal(i: int, m: nn.Module) -> str | None:
    """Why layer ``i`` cannot be in a chain (None: it can)."""
    kind = type(m)
    name = f"{kind.__name__} at position {i}"
    if kind is nn.Conv2d:
        if m.dilation != (1, 1):
            return f"{name} with dilation {m.dilation} (only dilation 1)"
        if m.groups != 1:
            return f"{name} with groups={m.groups} (only groups 1)"
        if isinstance(m.padding, str):
            return f"{name} with padding={m.padding!r} (only integer padding)"
        if m.padding_mode != "zeros":
            return f"{name} with padding_mode={m.padding_mode!r} (only 'zeros')"
        return None
    if kind is nn.MaxPool2d:
        return f"{name} with return_indices=True" if m.return_indices else None
    if kind is nn.Flatten:
        return None if (m.start_dim, m.end_dim) == (1, -1) else \
            f"{name} with start_dim={m.start_dim}, end_dim={m.end_dim} (only 1, -1)"
    if kind in (nn.Linear, nn.AvgPool2d) or kind in _ACTS:
        return None
    return f"{name} (supported: {', '.join(CONV_CHAIN_LAYERS)})"


@dataclass(frozen=True)
class ConvChain:
    """``z_0 = x``, ``z_{k+1} = layers[k](z_k)``: the model's function on ``(n, *in_shape)``.

    Attributes:
        layers: the modules in forward order (from :data:`CONV_CHAIN_LAYERS`; the parameterised
            ones are the model's own Conv2d / Linear modules).
    """

    layers: tuple[nn.Module, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or not all(isinstance(m, nn.Module) for m in self.layers):
            fail("hbk.ConvChain", "layers to be a non-empty sequence of nn.Module",
                 [type(m).__name__ for m in self.layers], TypeError, raw=True)
        for i, m in enumerate(self.layers):
            why = _layer_refusal(i, m)
            if why is not None:
                fail("hbk.ConvChain", "layers the closed-form chain supports", why, raw=True)
        if not any(type(m) in (nn.Conv2d, nn.Linear) for m in self.layers):
            fail("hbk.ConvChain", "at least one Conv2d or Linear layer",
                 [type(m).__name__ for m in self.layers], raw=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The chain's function (used to check a description against its model)."""
        for m in self.layers:
            x = m(x)
        return x


def _sequential_refusal(model: nn.Module) -> str | None:
    if type(model) is not nn.Sequential:
        return f"a {type(model).__name__} without a conv_chain() method"
    for i, m in enumerate(model):
        why = _layer_refusal(i, m)
        if why is not None:
            return why
    return None


def conv_chain_refusal(model: nn.Module) -> str:
    """Why :func:`find_conv_chain` finds no chain in ``model`` (for error messages)."""
    describe = getattr(model, "conv_chain", None)
    if callable(describe):
        return f"{type(model).__name__}.conv_chain() returned None"
    why = _sequential_refusal(model)
    if why is not None:
        return why
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a model with forward hooks"
    if list(model.buffers()):
        return "a model with buffers"
    return "a model whose parameters are not all in its Conv2d/Linear layers"


def find_conv_chain(model: nn.Module, fn: str = "hbk.HessianOperator") -> ConvChain | None:
    """The model's :class:`ConvChain`, or None when it is not (or does not say it is) one."""
    describe = getattr(model, "conv_chain", None)
    if callable(describe):
        spec = describe()
        if spec is not None and not isinstance(spec, ConvChain):
            fail(fn, f"{type(model).__name__}.conv_chain() to return a ConvChain or None",
                 spec, TypeError)
    elif type(model) is nn.Sequential and _sequential_refusal(model) is None and \
            any(type(m) in (nn.Conv2d, nn.Linear) for m in model):
        spec = ConvChain(tuple(model))
    else:
        spec = None
    return spec if spec is not None and chain_covers_model(model, spec.layers) else None
