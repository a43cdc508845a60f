"""Typed, validated wrappers over ``torch.ops.hbkernels.*``.

The checks here come first so that errors name the public function and argument (DESIGN.md,
"Errors"); the same rules guard the raw ops' fake kernels, and the C++ kernels check again
(see :mod:`hbkernels._opdefs`, which also registers the autograd formulas).

Conventions of every op: float32 or float64, all tensors of one call on one device; NaN in
gives NaN out; a zero norm gives cosine 0 (see :mod:`hbkernels.reference`). ``gram``,
``cosine_alignment`` and ``cosine_from_dots`` are differentiable; the ghost ops raise
``NotImplementedError("hbk.<op> is not differentiable ...")`` when an input requires grad
(call them on detached factors or under ``torch.no_grad()``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._opdefs import (
    validate_cosine_alignment,
    validate_cosine_from_dots,
    validate_factors,
    validate_flags,
    validate_gram,
    validate_products,
    validate_vectors,
)

_ops = torch.ops.hbkernels

__all__ = [
    "cosine_alignment",
    "cosine_from_dots",
    "ghost_alignment",
    "ghost_dots",
    "ghost_gram",
    "ghost_products",
    "ghost_sq_norms",
    "gram",
]


def gram(grads: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``K = G G^T`` of per-sample gradients.

    Args:
        grads: ``G``, shape ``(n, p)``, float32 or float64, any strides.

    Returns:
        ``(n, n)``, exactly symmetric. Computes only the upper triangle (half the GEMM work
        of ``G @ G.T``). Differentiable (``dG = (dK + dK^T) G``).
    """
    validate_gram("hbk.gram", grads)
    return _ops.gram(grads)


def cosine_alignment(grads: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cosine alignment ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)``.

    Args:
        grads: ``G``, shape ``(n, p)``, float32 or float64.
        vectors: ``V``, shape ``(p, k)``, same dtype and device.

    Returns:
        ``(n, k)``. A zero row ``g_i`` or zero column ``v_j`` gives alignment 0, never NaN (and
        gradient 0 there); NaN gives NaN. Differentiable.
    """
    validate_cosine_alignment("hbk.cosine_alignment", grads, vectors)
    return _ops.cosine_alignment(grads, vectors)


def ghost_gram(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
) -> torch.Tensor:
    """Gram matrix of per-sample gradients from per-layer factors, never forming ``G``.

    For a linear layer, sample ``i``'s weight gradient is ``sum_t d_it a_it^T`` (``T = 1`` for
    vector inputs), so ``K = sum_l (A_l A_l^T + b_l) * (D_l D_l^T)`` for ``T = 1`` and
    ``K_ij = sum_l sum_{t,s} (a_it.a_js)(d_it.d_js) + b_l (sum_t d_it).(sum_s d_js)`` otherwise.

    Args:
        inputs: layer inputs ``A_l``, each ``(n, d_in)`` or ``(n, T, d_in)``.
        output_grads: gradients of the per-sample losses w.r.t. the layer outputs ``D_l``,
            each ``(n, d_out)`` or ``(n, T, d_out)``.
        has_bias: whether each layer has a bias (``b_l = 1``): real bools, one per layer.

    Returns:
        ``(n, n)``, exactly symmetric; computed tile by tile (no per-layer ``n x n`` buffer).
        Not differentiable.
    """
    fn = "hbk.ghost_gram"
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    has_bias = validate_flags(fn, has_bias, len(inputs))
    return _ops.ghost_gram(inputs, output_grads, has_bias)


def ghost_dots(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    weight_vectors: Sequence[torch.Tensor],
    bias_vectors: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """Inner products ``<g_i, v_j>`` of per-sample gradients with vectors, from factors.

    Args:
        inputs, output_grads: as in :func:`ghost_gram`.
        weight_vectors: per layer, the weight part of ``V`` as ``(d_out, d_in, k)`` (for a
            ``(p, k)`` matrix ``V`` in parameter order: ``V[off:off + d_out*d_in].view(d_out,
            d_in, k)``, a free view).
        bias_vectors: per layer, the bias part ``(d_out, k)``, or None for no bias.

    Returns:
        ``(n, k)`` raw inner products. Not differentiable.
    """
    fn = "hbk.ghost_dots"
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    weight_vectors, bias_vectors = validate_vectors(fn, inputs, output_grads, weight_vectors,
                                                    bias_vectors)
    return _ops.ghost_dots(inputs, output_grads, weight_vectors, bias_vectors)


def ghost_sq_norms(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
) -> torch.Tensor:
    """Squared per-sample gradient norms from factors: ``sum_l (|a_i|^2 + b_l) |d_i|^2``.

    Args: as in :func:`ghost_gram`.

    Returns:
        ``(n,)``, ``>= 0``. Not differentiable.
    """
    fn = "hbk.ghost_sq_norms"
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    has_bias = validate_flags(fn, has_bias, len(inputs))
    return _ops.ghost_sq_norms(inputs, output_grads, has_bias)


def ghost_products(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
    weight_vectors: Sequence[torch.Tensor],
    bias_vectors: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dots ``<g_i, v_j>`` and squared norms ``|g_i|^2`` from factors in one call.

    The result of :func:`ghost_dots` and :func:`ghost_sq_norms` together, with the factors
    validated and viewed once (the per-sample engine's one call per block).

    Args:
        inputs, output_grads, has_bias: as in :func:`ghost_gram`.
        weight_vectors: per layer, ``(d_out, d_in, k)`` as in :func:`ghost_dots`.
        bias_vectors: the bias parts ``(d_out, k)``, one per layer **with a bias**, in layer
            order (packed: no entry for a layer without bias).

    Returns:
        ``(dots, sq_norms)``: ``(n, k)`` and ``(n,)`` (``>= 0``). Not differentiable.
    """
    inputs, output_grads, has_bias, weight_vectors, bias_vectors = validate_products(
        "hbk.ghost_products", inputs, output_grads, has_bias, weight_vectors, bias_vectors)
    return _ops.ghost_products(inputs, output_grads, has_bias, weight_vectors, bias_vectors)


def ghost_alignment(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    weight_vectors: Sequence[torch.Tensor],
    bias_vectors: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """Cosine alignment of per-sample gradients with vectors, from per-layer factors.

    ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)`` where ``g_i`` and ``v_j`` cover exactly the given
    layers' parameters. Zero norms give 0; NaN gives NaN. Arguments as in :func:`ghost_dots`.

    Returns:
        ``(n, k)``. Not differentiable.
    """
    fn = "hbk.ghost_alignment"
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    weight_vectors, bias_vectors = validate_vectors(fn, inputs, output_grads, weight_vectors,
                                                    bias_vectors)
    return _ops.ghost_alignment(inputs, output_grads, weight_vectors, bias_vectors)


def cosine_from_dots(
    dots: torch.Tensor, grad_sq_norms: torch.Tensor, vector_sq_norms: torch.Tensor
) -> torch.Tensor:
    """``dots[i, j] / (sqrt(grad_sq_norms[i]) sqrt(vector_sq_norms[j]))``.

    Combines partial results (e.g. factored layers plus other parameters) into a cosine.

    Args:
        dots: ``(n, k)``, float32 or float64.
        grad_sq_norms: ``(n,)``, same dtype and device, ``>= 0``.
        vector_sq_norms: ``(k,)``, same dtype and device, ``>= 0``.

    Returns:
        ``(n, k)``; 0 where a squared norm is 0 (gradient 0 there), NaN where an input is NaN.
        Differentiable in all three arguments.

    Raises:
        ValueError: a negative squared norm (checked in the kernel, which names the argument).
    """
    validate_cosine_from_dots("hbk.cosine_from_dots", dots, grad_sq_norms, vector_sq_norms)
    return _ops.cosine_from_dots(dots, grad_sq_norms, vector_sq_norms)
