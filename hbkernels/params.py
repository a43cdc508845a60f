"""One parameter order everywhere: ``model.parameters()``, each tensor flattened row-major.

Eigenvectors, per-sample gradient columns and alignment vectors all use this order.
"""

from __future__ import annotations

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    """Number of trainable scalars ``p``."""
    return sum(p.numel() for p in trainable_parameters(model))


def flatten_params(model: nn.Module) -> torch.Tensor:
    """Concatenate the trainable parameters into one ``(p,)`` vector (a copy, no grad).

    Args:
        model: any module.

    Returns:
        ``(p,)`` tensor in ``model.parameters()`` order.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("hbk.flatten_params: expected a model with trainable parameters, got none")
    return torch.cat([p.detach().reshape(-1) for p in params])


def unflatten_like(vec: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """Split a ``(p,)`` or ``(p, k)`` tensor into views shaped like the model's parameters.

    Args:
        vec: ``(p,)`` or ``(p, k)`` in :func:`flatten_params` order.
        model: the module whose trainable parameters define the shapes.

    Returns:
        One view per parameter, shaped ``param.shape`` (or ``(*param.shape, k)``).
    """
    params = trainable_parameters(model)
    p = sum(t.numel() for t in params)
    if not isinstance(vec, torch.Tensor) or vec.dim() not in (1, 2) or vec.shape[0] != p:
        got = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
        raise ValueError(f"hbk.unflatten_like: expected a tensor of shape ({p},) or ({p}, k), got {got}")
    out, offset = [], 0
    tail = tuple(vec.shape[1:])
    for t in params:
        out.append(vec[offset : offset + t.numel()].view(*t.shape, *tail))
        offset += t.numel()
    return out
