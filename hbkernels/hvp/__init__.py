"""Curvature products of an :class:`~hbkernels.objective.Objective`: one class per method.

* :class:`ReverseOverReverse` (``"double_backward"``): double backward; the first-order graph
  is kept when the data is one in-memory batch;
* :class:`ForwardOverReverse` (``"forward_over_reverse"``): ``jvp(grad)`` with torch.func,
  vmapped over blocks;
* :class:`ChainProducts` (``"linear_chain"``): closed forms for a :class:`LinearChain`
  (Hessian, or Gauss-Newton with ``ggn=True``), identity columns with symmetry;
* :class:`ConvChainProducts` (``"conv_chain"``): closed forms for a :class:`ConvChain`
  (Conv2d, pooling, flatten, activations, Linear);
* :class:`JacobianGGN` (``"jvp_vjp"``): Gauss-Newton products ``J^T H_out J`` for any model.

The ``auto`` rule (:func:`hessian_method`, :func:`ggn_method`) decides from the model's
structure, never from timed trial products: the closed-form chain when the model provides a
chain that fits the data (a :class:`LinearChain` first, else a :class:`ConvChain`), else reverse-over-reverse (Hessian) or JVP/VJP (Gauss-Newton).
Every product runs attention through the math SDPA backend (:func:`math_attention`).
"""

from __future__ import annotations

from ..checks import fail
from .base import HVPMethod, identity_block, math_attention, output_hessian
from .chain import CHAIN_ACTIVATIONS, LinearChain, find_chain
from .chain_hvp import ChainProducts, chain_unfit_reason
from .compiled import CompiledHVP
from .conv_chain import ConvChain, conv_chain_refusal, find_conv_chain
from .conv_chain_hvp import ConvChainProducts, conv_chain_unfit_reason
from .forward import ForwardOverReverse
from .ggn import JacobianGGN
from .reverse import ReverseOverReverse

__all__ = [
    "CHAIN_ACTIVATIONS",
    "GGN_METHODS",
    "HESSIAN_METHODS",
    "ChainProducts",
    "CompiledHVP",
    "ConvChain",
    "ConvChainProducts",
    "ForwardOverReverse",
    "HVPMethod",
    "JacobianGGN",
    "LinearChain",
    "ReverseOverReverse",
    "find_chain",
    "find_conv_chain",
    "ggn_method",
    "hessian_method",
    "identity_block",
    "math_attention",
    "output_hessian",
]

HESSIAN_METHODS = ("auto", "double_backward", "reverse_over_reverse", "forward_over_reverse",
                   "linear_chain", "conv_chain", "compiled")
GGN_METHODS = ("auto", "jvp_vjp", "linear_chain", "conv_chain")


def _fitting(obj, find, unfit_reason):
    """The model's chain (``find``) if its closed forms can serve the objective's data, else None."""
    chain = find(obj.model, obj.fn)
    if chain is None or unfit_reason(obj, chain, obj.data.first()) is not None:
        return None
    return chain


def _chain_for(obj):
    return _fitting(obj, find_chain, chain_unfit_reason)


def _no_chain(fn: str, obj) -> None:
    chain = find_chain(obj.model, fn)
    got = (f"{type(obj.model).__name__}" if chain is None else
           chain_unfit_reason(obj, chain, obj.data.first()))
    fail(fn, "a Linear/activation chain for method='linear_chain' (an nn.Sequential of [Flatten,] "
         "Linear, ReLU|Tanh|Sigmoid, ..., Linear, or a model with a linear_chain() method) and "
         "(X, y) data it can take", got, raw=True)


def _conv_chain_for(obj):
    return _fitting(obj, find_conv_chain, conv_chain_unfit_reason)


def _no_conv_chain(fn: str, obj) -> None:
    chain = find_conv_chain(obj.model, fn)
    got = (conv_chain_refusal(obj.model) if chain is None else
           conv_chain_unfit_reason(obj, chain, obj.data.first()))
    fail(fn, "a convolutional chain for method='conv_chain' (an nn.Sequential of Conv2d, "
         "MaxPool2d, AvgPool2d, Flatten, ReLU|Tanh|Sigmoid, Linear layers, or a model with a "
         "conv_chain() method) and (X, y) data it can take", got, raw=True)


def _strategy(fn: str, obj, method: str, ggn: bool) -> HVPMethod | None:
    """The closed-form chain products for ``method`` (auto, linear_chain, conv_chain), if any."""
    if method in ("auto", "linear_chain"):
        chain = _chain_for(obj)
        if chain is not None:
            return ChainProducts(obj, chain, ggn=ggn)
        if method == "linear_chain":
            _no_chain(fn, obj)
    conv = _conv_chain_for(obj)
    if conv is not None:
        return ConvChainProducts(obj, conv, ggn=ggn)
    if method == "conv_chain":
        _no_conv_chain(fn, obj)
    return None


def hessian_method(fn: str, obj, method: str) -> HVPMethod:
    """The Hessian product strategy ``method`` (one of :data:`HESSIAN_METHODS`) for ``obj``."""
    if method in ("double_backward", "reverse_over_reverse"):
        return ReverseOverReverse(obj)
    if method == "forward_over_reverse":
        return ForwardOverReverse(obj)
    if method == "compiled":  # never chosen by auto: compiling costs more than it saves on CPU
        return CompiledHVP(obj, fn)
    return _strategy(fn, obj, method, False) or ReverseOverReverse(obj)


def ggn_method(fn: str, obj, method: str) -> HVPMethod:
    """The Gauss-Newton product strategy ``method`` (one of :data:`GGN_METHODS`) for ``obj``."""
    if method == "jvp_vjp":
        return JacobianGGN(obj)
    return _strategy(fn, obj, method, True) or JacobianGGN(obj)
