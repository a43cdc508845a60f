"""Argument rules, fake kernels and autograd formulas of the ``torch.ops.hbkernels`` ops.

One set of rules (the ``validate_*`` functions) serves two callers:

* the typed wrappers of :mod:`hbkernels.ops`, with the public name (``"hbk.gram"``), before any
  work starts;
* the fake kernels below, with the raw op's name (``"hbk::gram"``), so that a raw op reached
  without the wrappers (``torch.ops.hbkernels.*``, ``torch.compile``, FakeTensor or ``meta``
  tensors) refuses bad shapes, dtypes and devices instead of inventing an output. A CPU tensor
  next to a ``meta`` one dispatches here (not to C++): the device check is what turns that into
  an error rather than uninitialised CPU memory.

Shape relations go through :func:`hbkernels.checks.check_that` (``torch._check_with``), which
accepts the symbolic sizes of dynamic-shape tracing. Value checks (a negative squared norm) are
in C++ only: they need the data.

Autograd: ``gram``, ``cosine_alignment`` and ``cosine_from_dots`` have formulas (below); the
ghost ops refuse inputs that require grad in C++ (csrc/ops.cpp, "hbk.<op> is not
differentiable").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._loader import load_extension
from .checks import check_tensor, check_that, fail
from .reference import safe_inverse

load_extension()

_FACTOR_DIMS = (2, 3)


# ----------------------------------------------------------------------------- rules
def as_tensor_list(fn: str, name: str, seq) -> list:
    """``seq`` as a list; a tensor, string or non-sequence is a TypeError (a tensor would
    otherwise be split into its rows)."""
    if isinstance(seq, (torch.Tensor, str, bytes)) or not isinstance(seq, Sequence):
        fail(fn, f"{name} to be a list of tensors, one per layer", seq, TypeError)
    return list(seq)


def check_like(fn: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s dtype and device (TypeError otherwise)."""
    if t.dtype != ref.dtype:  # dtypes and devices are never symbolic: plain checks
        fail(fn, f"{name} to have dtype {ref.dtype}", t.dtype, TypeError, raw=True)
    if t.device != ref.device:
        fail(fn, f"{name} on device {ref.device}", t.device, TypeError, raw=True)


def validate_gram(fn: str, grads) -> None:
    check_tensor(fn, "grads", grads, (2,), floating=True)


def validate_cosine_alignment(fn: str, grads, vectors) -> None:
    check_tensor(fn, "grads", grads, (2,), floating=True)
    check_tensor(fn, "vectors", vectors, (2,), floating=True)
    check_like(fn, "vectors", vectors, grads)
    check_that(vectors.shape[0] == grads.shape[1], fn,
               f"vectors of shape ({grads.shape[1]}, k)", f"{tuple(vectors.shape)}")


def validate_factors(fn: str, inputs, output_grads) -> tuple[list, list]:
    """Per-layer factors: (n, d) or (n, T, d), one dtype and device, a common n."""
    inputs = as_tensor_list(fn, "inputs", inputs)
    output_grads = as_tensor_list(fn, "output_grads", output_grads)
    check_that(len(inputs) > 0, fn, "at least one layer in inputs", "none")
    check_that(len(output_grads) == len(inputs), fn,
               f"one output_grads entry per layer ({len(inputs)})", len(output_grads))
    ref = check_tensor(fn, "inputs[0]", inputs[0], _FACTOR_DIMS, floating=True)
    for i, (a, d) in enumerate(zip(inputs, output_grads)):
        check_tensor(fn, f"inputs[{i}]", a, _FACTOR_DIMS, floating=True)
        check_tensor(fn, f"output_grads[{i}]", d, _FACTOR_DIMS, floating=True)
        check_like(fn, f"inputs[{i}]", a, ref)
        check_like(fn, f"output_grads[{i}]", d, ref)
        what = (f"inputs[{i}] and output_grads[{i}] to share the leading (n,) or (n, T) "
                "dimensions")
        got = f"{tuple(a.shape)} and {tuple(d.shape)}"
        check_that(a.dim() == d.dim(), fn, what, got)
        for j in range(a.dim() - 1):
            check_that(a.shape[j] == d.shape[j], fn, what, got)
        check_that(a.shape[0] == ref.shape[0], fn,
                   f"every layer to have n = {ref.shape[0]} samples",
                   f"{a.shape[0]} in inputs[{i}]")
    return inputs, output_grads


def validate_flags(fn: str, has_bias, layers: int) -> list[bool]:
    """One real bool per layer (``"False"`` or ``0`` is a TypeError, not a truthy flag)."""
    if isinstance(has_bias, (torch.Tensor, str, bytes)) or not isinstance(has_bias, Sequence):
        fail(fn, "has_bias to be a list of bools, one per layer", has_bias, TypeError)
    flags = list(has_bias)
    for i, b in enumerate(flags):
        if not isinstance(b, bool):
            fail(fn, f"has_bias[{i}] to be True or False", b, TypeError)
    check_that(len(flags) == layers, fn, f"one has_bias flag per layer ({layers})", len(flags))
    return flags


def per_layer_bias(fn: str, has_bias: list[bool], bias_vectors) -> list:
    """The packed ``bias_vectors`` of ``ghost_products`` (one per layer with a bias) spread
    over the layers, None where a layer has no bias."""
    packed = as_tensor_list(fn, "bias_vectors", bias_vectors)
    check_that(len(packed) == sum(has_bias), fn,
               f"one bias_vectors entry per layer with a bias ({sum(has_bias)})", len(packed))
    it = iter(packed)
    return [next(it) if b else None for b in has_bias]


def validate_vectors(fn: str, inputs: list, output_grads: list, weight_vectors,
                     bias_vectors, bias_names: Sequence[str] | None = None) -> tuple[list, list]:
    """Per-layer slices of the vectors: W_l (d_out, d_in, k) and w_l (d_out, k) or None.

    ``bias_names`` names each layer's bias entry in messages (default ``bias_vectors[l]``).
    """
    weight_vectors = as_tensor_list(fn, "weight_vectors", weight_vectors)
    bias_vectors = as_tensor_list(fn, "bias_vectors", bias_vectors)
    layers = len(inputs)
    check_that(len(weight_vectors) == layers and len(bias_vectors) == layers, fn,
               f"one weight_vectors and one bias_vectors entry per layer ({layers})",
               f"{len(weight_vectors)} and {len(bias_vectors)}")
    k = None
    for i, (a, d, w, b) in enumerate(zip(inputs, output_grads, weight_vectors, bias_vectors)):
        check_tensor(fn, f"weight_vectors[{i}]", w, (3,), floating=True)
        check_like(fn, f"weight_vectors[{i}]", w, a)
        k = w.shape[2] if k is None else k
        d_in, d_out = a.shape[-1], d.shape[-1]
        got = f"{tuple(w.shape)}"
        check_that(w.shape[1] == d_in, fn, f"weight_vectors[{i}] of shape (d_out, {d_in}, {k})",
                   got)
        check_that(w.shape[2] == k, fn, f"weight_vectors[{i}] of shape (d_out, {d_in}, {k})",
                   got)
        check_that(w.shape[0] == d_out, fn, f"weight_vectors[{i}] of shape ({d_out}, d_in, k)",
                   got)
        if b is None:
            continue
        name = bias_names[i] if bias_names is not None else f"bias_vectors[{i}]"
        check_tensor(fn, name, b, (2,), floating=True)
        check_like(fn, name, b, a)
        for j, size in enumerate((d_out, k)):
            check_that(b.shape[j] == size, fn, f"{name} of shape ({d_out}, {k})",
                       f"{tuple(b.shape)}")
    return weight_vectors, bias_vectors


def validate_products(fn: str, inputs, output_grads, has_bias, weight_vectors, bias_vectors):
    """The arguments of ``ghost_products``; returns the lists and the per-layer bias slices."""
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    flags = validate_flags(fn, has_bias, len(inputs))
    spread = per_layer_bias(fn, flags, bias_vectors)
    names, j = [], 0
    for b in flags:
        names.append(f"bias_vectors[{j}]" if b else "")
        j += b
    weight_vectors, _ = validate_vectors(fn, inputs, output_grads, weight_vectors, spread, names)
    return inputs, output_grads, flags, weight_vectors, [b for b in spread if b is not None]


def validate_cosine_from_dots(fn: str, dots, grad_sq_norms, vector_sq_norms) -> None:
    check_tensor(fn, "dots", dots, (2,), floating=True)
    check_tensor(fn, "grad_sq_norms", grad_sq_norms, (1,), floating=True)
    check_tensor(fn, "vector_sq_norms", vector_sq_norms, (1,), floating=True)
    check_like(fn, "grad_sq_norms", grad_sq_norms, dots)
    check_like(fn, "vector_sq_norms", vector_sq_norms, dots)
    check_that(grad_sq_norms.shape[0] == dots.shape[0], fn,
               f"grad_sq_norms of shape ({dots.shape[0]},)", f"{tuple(grad_sq_norms.shape)}")
    check_that(vector_sq_norms.shape[0] == dots.shape[1], fn,
               f"vector_sq_norms of shape ({dots.shape[1]},)", f"{tuple(vector_sq_norms.shape)}")


# ----------------------------------------------------------------------------- fake kernels
# The same rules as the wrappers, then shapes only (torch.compile / FakeTensor / meta).
@torch.library.register_fake("hbkernels::gram")
def _gram_fake(grads):
    validate_gram("hbk::gram", grads)
    return grads.new_empty((grads.shape[0], grads.shape[0]))


@torch.library.register_fake("hbkernels::cosine_alignment")
def _cosine_alignment_fake(grads, vectors):
    validate_cosine_alignment("hbk::cosine_alignment", grads, vectors)
    return grads.new_empty((grads.shape[0], vectors.shape[1]))


@torch.library.register_fake("hbkernels::ghost_gram")
def _ghost_gram_fake(inputs, output_grads, has_bias):
    inputs, _ = validate_factors("hbk::ghost_gram", inputs, output_grads)
    validate_flags("hbk::ghost_gram", has_bias, len(inputs))
    n = inputs[0].shape[0]
    return inputs[0].new_empty((n, n))


@torch.library.register_fake("hbkernels::ghost_sq_norms")
def _ghost_sq_norms_fake(inputs, output_grads, has_bias):
    inputs, _ = validate_factors("hbk::ghost_sq_norms", inputs, output_grads)
    validate_flags("hbk::ghost_sq_norms", has_bias, len(inputs))
    return inputs[0].new_empty((inputs[0].shape[0],))


def _dots_fake(fn, inputs, output_grads, weight_vectors, bias_vectors):
    inputs, output_grads = validate_factors(fn, inputs, output_grads)
    weight_vectors, _ = validate_vectors(fn, inputs, output_grads, weight_vectors, bias_vectors)
    return inputs[0].new_empty((inputs[0].shape[0], weight_vectors[0].shape[2]))


@torch.library.register_fake("hbkernels::ghost_dots")
def _ghost_dots_fake(inputs, output_grads, weight_vectors, bias_vectors):
    return _dots_fake("hbk::ghost_dots", inputs, output_grads, weight_vectors, bias_vectors)


@torch.library.register_fake("hbkernels::ghost_alignment")
def _ghost_alignment_fake(inputs, output_grads, weight_vectors, bias_vectors):
    return _dots_fake("hbk::ghost_alignment", inputs, output_grads, weight_vectors, bias_vectors)


@torch.library.register_fake("hbkernels::ghost_products")
def _ghost_products_fake(inputs, output_grads, has_bias, weight_vectors, bias_vectors):
    inputs, _, _, weight_vectors, _ = validate_products(
        "hbk::ghost_products", inputs, output_grads, has_bias, weight_vectors, bias_vectors)
    n, k = inputs[0].shape[0], weight_vectors[0].shape[2]
    return inputs[0].new_empty((n, k)), inputs[0].new_empty((n,))


@torch.library.register_fake("hbkernels::cosine_from_dots")
def _cosine_from_dots_fake(dots, grad_sq_norms, vector_sq_norms):
    validate_cosine_from_dots("hbk::cosine_from_dots", dots, grad_sq_norms, vector_sq_norms)
    return dots.new_empty(dots.shape)


# ----------------------------------------------------------------------------- autograd
# Backward formulas in plain torch ops (so they are differentiable again). At a zero norm the
# cosine is the constant 0 of the convention, so its gradient there is 0.
def _save_inputs_and_output(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _gram_backward(ctx, gK):
    G, _ = ctx.saved_tensors
    return (gK + gK.mT) @ G


def _cosine_alignment_backward(ctx, gC):
    # C = Gh Vh with Gh = diag(rg) G, Vh = V diag(rv); d Gh_i . Gh_i = sum_j gC_ij C_ij.
    G, V, C = ctx.saved_tensors
    rg, rv = safe_inverse(G.norm(dim=1)), safe_inverse(V.norm(dim=0))
    gCC = gC * C
    gG = gV = None
    if ctx.needs_input_grad[0]:
        gG = rg[:, None] * ((gC * rv) @ V.mT) - (rg.square() * gCC.sum(1))[:, None] * G
    if ctx.needs_input_grad[1]:
        gV = rv * (G.mT @ (gC * rg[:, None])) - rv.square() * gCC.sum(0) * V
    return gG, gV


def _cosine_from_dots_backward(ctx, gC):
    # C_ij = X_ij g_i^(-1/2) v_j^(-1/2): dC/dg_i = -C_ij / (2 g_i).
    _, g, v, C = ctx.saved_tensors
    gCC = gC * C
    gX = gg = gv = None
    if ctx.needs_input_grad[0]:
        gX = gC * safe_inverse(g.sqrt())[:, None] * safe_inverse(v.sqrt())
    if ctx.needs_input_grad[1]:
        gg = -0.5 * gCC.sum(1) * safe_inverse(g)
    if ctx.needs_input_grad[2]:
        gv = -0.5 * gCC.sum(0) * safe_inverse(v)
    return gX, gg, gv


for _name, _backward in (
    ("gram", _gram_backward),
    ("cosine_alignment", _cosine_alignment_backward),
    ("cosine_from_dots", _cosine_from_dots_backward),
):
    torch.library.register_autograd(f"hbkernels::{_name}", _backward,
                                    setup_context=_save_inputs_and_output)
