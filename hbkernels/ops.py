"""Typed, validated wrappers over ``torch.ops.hbkernels.*`` and their fake kernels.

The C++ kernels check their inputs too; the checks here come first so that errors name the
public function and argument (DESIGN.md, "Errors").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._loader import load_extension

load_extension()
_ops = torch.ops.hbkernels

__all__ = [
    "gram",
    "cosine_alignment",
    "ghost_gram",
    "ghost_dots",
    "ghost_sq_norms",
    "ghost_alignment",
    "cosine_from_dots",
]

_FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _check_tensor(fn: str, name: str, t, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: expected {name} to be float32 or float64, got {t.dtype}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{fn}: expected {name} to be {want}, got shape {tuple(t.shape)}")


def _check_like(fn: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: expected {name} to have dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise TypeError(f"{fn}: expected {name} on device {ref.device}, got {t.device}")


def _check_factors(fn: str, inputs, output_grads) -> tuple[list, list]:
    inputs, output_grads = list(inputs), list(output_grads)
    if not inputs:
        raise ValueError(f"{fn}: expected at least one layer in inputs, got none")
    if len(output_grads) != len(inputs):
        raise ValueError(
            f"{fn}: expected one output_grads entry per layer ({len(inputs)}), "
            f"got {len(output_grads)}"
        )
    ref = inputs[0]
    _check_tensor(fn, "inputs[0]", ref, (2, 3))
    for i, (a, d) in enumerate(zip(inputs, output_grads)):
        _check_tensor(fn, f"inputs[{i}]", a, (2, 3))
        _check_tensor(fn, f"output_grads[{i}]", d, (2, 3))
        _check_like(fn, f"inputs[{i}]", a, ref)
        _check_like(fn, f"output_grads[{i}]", d, ref)
        if a.dim() != d.dim() or a.shape[:-1] != d.shape[:-1]:
            raise ValueError(
                f"{fn}: expected inputs[{i}] and output_grads[{i}] to share the leading "
                f"(n,) or (n, T) dimensions, got {tuple(a.shape)} and {tuple(d.shape)}"
            )
        if a.shape[0] != ref.shape[0]:
            raise ValueError(
                f"{fn}: expected every layer to have n = {ref.shape[0]} samples, "
                f"got {a.shape[0]} in inputs[{i}]"
            )
    return inputs, output_grads


def _check_vectors(fn: str, inputs, weight_vectors, bias_vectors) -> tuple[list, list]:
    weight_vectors, bias_vectors = list(weight_vectors), list(bias_vectors)
    if len(weight_vectors) != len(inputs) or len(bias_vectors) != len(inputs):
        raise ValueError(
            f"{fn}: expected one weight_vectors and one bias_vectors entry per layer "
            f"({len(inputs)}), got {len(weight_vectors)} and {len(bias_vectors)}"
        )
    k = None
    for i, (a, w, b) in enumerate(zip(inputs, weight_vectors, bias_vectors)):
        _check_tensor(fn, f"weight_vectors[{i}]", w, (3,))
        _check_like(fn, f"weight_vectors[{i}]", w, a)
        k = w.shape[2] if k is None else k
        if w.shape[1] != a.shape[-1] or w.shape[2] != k:
            raise ValueError(
                f"{fn}: expected weight_vectors[{i}] of shape (d_out, {a.shape[-1]}, {k}), "
                f"got {tuple(w.shape)}"
            )
        if b is not None:
            _check_tensor(fn, f"bias_vectors[{i}]", b, (2,))
            _check_like(fn, f"bias_vectors[{i}]", b, a)
            if tuple(b.shape) != (w.shape[0], k):
                raise ValueError(
                    f"{fn}: expected bias_vectors[{i}] of shape ({w.shape[0]}, {k}), "
                    f"got {tuple(b.shape)}"
                )
    return weight_vectors, bias_vectors


def _check_out_dims(fn: str, output_grads, weight_vectors) -> None:
    for i, (d, w) in enumerate(zip(output_grads, weight_vectors)):
        if w.shape[0] != d.shape[-1]:
            raise ValueError(
                f"{fn}: expected weight_vectors[{i}] of shape ({d.shape[-1]}, d_in, k), "
                f"got {tuple(w.shape)}"
            )


# ----------------------------------------------------------------------------- public ops
def gram(grads: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``K = G G^T`` of per-sample gradients.

    Args:
        grads: ``G``, shape ``(n, p)``, float32 or float64, any strides.

    Returns:
        ``(n, n)``, exactly symmetric. Computes only the upper triangle (half the GEMM work
        of ``G @ G.T``).
    """
    _check_tensor("hbk.gram", "grads", grads, (2,))
    return _ops.gram(grads)


def cosine_alignment(grads: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cosine alignment ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)``.

    Args:
        grads: ``G``, shape ``(n, p)``, float32 or float64.
        vectors: ``V``, shape ``(p, k)``, same dtype and device.

    Returns:
        ``(n, k)``. A zero row ``g_i`` or zero column ``v_j`` gives alignment 0, never NaN.
    """
    fn = "hbk.cosine_alignment"
    _check_tensor(fn, "grads", grads, (2,))
    _check_tensor(fn, "vectors", vectors, (2,))
    _check_like(fn, "vectors", vectors, grads)
    if vectors.shape[0] != grads.shape[1]:
        raise ValueError(
            f"{fn}: expected vectors of shape ({grads.shape[1]}, k), got {tuple(vectors.shape)}"
        )
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
        has_bias: whether each layer has a bias (``b_l = 1``).

    Returns:
        ``(n, n)``, exactly symmetric; computed tile by tile (no per-layer ``n x n`` buffer).
    """
    fn = "hbk.ghost_gram"
    inputs, output_grads = _check_factors(fn, inputs, output_grads)
    has_bias = [bool(b) for b in has_bias]
    if len(has_bias) != len(inputs):
        raise ValueError(
            f"{fn}: expected one has_bias flag per layer ({len(inputs)}), got {len(has_bias)}"
        )
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
        ``(n, k)`` raw inner products.
    """
    fn = "hbk.ghost_dots"
    inputs, output_grads = _check_factors(fn, inputs, output_grads)
    weight_vectors, bias_vectors = _check_vectors(fn, inputs, weight_vectors, bias_vectors)
    _check_out_dims(fn, output_grads, weight_vectors)
    return _ops.ghost_dots(inputs, output_grads, weight_vectors, bias_vectors)


def ghost_sq_norms(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
) -> torch.Tensor:
    """Squared per-sample gradient norms from factors: ``sum_l (|a_i|^2 + b_l) |d_i|^2``.

    Args: as in :func:`ghost_gram`.

    Returns:
        ``(n,)``.
    """
    fn = "hbk.ghost_sq_norms"
    inputs, output_grads = _check_factors(fn, inputs, output_grads)
    has_bias = [bool(b) for b in has_bias]
    if len(has_bias) != len(inputs):
        raise ValueError(
            f"{fn}: expected one has_bias flag per layer ({len(inputs)}), got {len(has_bias)}"
        )
    return _ops.ghost_sq_norms(inputs, output_grads, has_bias)


def ghost_alignment(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    weight_vectors: Sequence[torch.Tensor],
    bias_vectors: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """Cosine alignment of per-sample gradients with vectors, from per-layer factors.

    ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)`` where ``g_i`` and ``v_j`` cover exactly the given
    layers' parameters. Zero norms give 0. Arguments as in :func:`ghost_dots`.

    Returns:
        ``(n, k)``.
    """
    fn = "hbk.ghost_alignment"
    inputs, output_grads = _check_factors(fn, inputs, output_grads)
    weight_vectors, bias_vectors = _check_vectors(fn, inputs, weight_vectors, bias_vectors)
    _check_out_dims(fn, output_grads, weight_vectors)
    return _ops.ghost_alignment(inputs, output_grads, weight_vectors, bias_vectors)


def cosine_from_dots(
    dots: torch.Tensor, grad_sq_norms: torch.Tensor, vector_sq_norms: torch.Tensor
) -> torch.Tensor:
    """``dots[i, j] / (sqrt(grad_sq_norms[i]) sqrt(vector_sq_norms[j]))``, 0 where a norm is 0.

    Combines partial results (e.g. factored layers plus other parameters) into a cosine.
    """
    fn = "hbk.cosine_from_dots"
    _check_tensor(fn, "dots", dots, (2,))
    _check_tensor(fn, "grad_sq_norms", grad_sq_norms, (1,))
    _check_tensor(fn, "vector_sq_norms", vector_sq_norms, (1,))
    _check_like(fn, "grad_sq_norms", grad_sq_norms, dots)
    _check_like(fn, "vector_sq_norms", vector_sq_norms, dots)
    if grad_sq_norms.shape[0] != dots.shape[0] or vector_sq_norms.shape[0] != dots.shape[1]:
        raise ValueError(
            f"{fn}: expected grad_sq_norms ({dots.shape[0]},) and vector_sq_norms "
            f"({dots.shape[1]},), got {tuple(grad_sq_norms.shape)} and "
            f"{tuple(vector_sq_norms.shape)}"
        )
    return _ops.cosine_from_dots(dots, grad_sq_norms, vector_sq_norms)


# ----------------------------------------------------------------------------- fake kernels
# Shapes only, so torch.compile / FakeTensor tracing works without running the kernels.
@torch.library.register_fake("hbkernels::gram")
def _gram_fake(grads):
    return grads.new_empty((grads.shape[0], grads.shape[0]))


@torch.library.register_fake("hbkernels::ghost_gram")
def _ghost_gram_fake(inputs, output_grads, has_bias):
    n = inputs[0].shape[0]
    return inputs[0].new_empty((n, n))


@torch.library.register_fake("hbkernels::cosine_alignment")
def _cosine_alignment_fake(grads, vectors):
    return grads.new_empty((grads.shape[0], vectors.shape[1]))


@torch.library.register_fake("hbkernels::ghost_dots")
def _ghost_dots_fake(inputs, output_grads, weight_vectors, bias_vectors):
    return inputs[0].new_empty((inputs[0].shape[0], weight_vectors[0].shape[2]))


@torch.library.register_fake("hbkernels::ghost_sq_norms")
def _ghost_sq_norms_fake(inputs, output_grads, has_bias):
    return inputs[0].new_empty((inputs[0].shape[0],))


@torch.library.register_fake("hbkernels::ghost_alignment")
def _ghost_alignment_fake(inputs, output_grads, weight_vectors, bias_vectors):
    return inputs[0].new_empty((inputs[0].shape[0], weight_vectors[0].shape[2]))


@torch.library.register_fake("hbkernels::cosine_from_dots")
def _cosine_from_dots_fake(dots, grad_sq_norms, vector_sq_norms):
    return dots.new_empty(dots.shape)
