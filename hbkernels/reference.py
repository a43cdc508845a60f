"""Plain-torch references for every kernel: the ground truth of tests and benchmarks.

Each function is the obvious composite of torch ops, with the same conventions as the kernel
it mirrors. They favour clarity over memory.

Conventions (shared with the kernels): a zero norm (a zero gradient ``g_i`` or a zero vector
``v_j``) gives cosine 0, never NaN (the cosine is undefined there; 0 is "no alignment"). NaN in
gives NaN out: a NaN norm is never turned into 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def safe_inverse(norms: torch.Tensor) -> torch.Tensor:
    """``1 / norms``, 0 where ``norms == 0`` (the zero-norm convention); NaN stays NaN."""
    return torch.where(norms == 0, torch.zeros_like(norms), 1.0 / norms)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


def gram(grads: torch.Tensor) -> torch.Tensor:
    """``G @ G.T``."""
    return grads @ grads.T


def cosine_alignment(grads: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``(G V) / (|g_i| |v_j|)`` with zero norms giving 0."""
    dots = grads @ vectors
    rg, rv = safe_inverse(grads.norm(dim=1)), safe_inverse(vectors.norm(dim=0))
    return dots * rg[:, None] * rv[None, :]


def cosine_from_dots(dots, grad_sq_norms, vector_sq_norms) -> torch.Tensor:
    """``dots / (sqrt(g) sqrt(v))`` with zero norms giving 0."""
    return (
        dots
        * safe_inverse(grad_sq_norms.sqrt())[:, None]
        * safe_inverse(vector_sq_norms.sqrt())[None, :]
    )


def per_sample_grads_from_factors(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
) -> torch.Tensor:
    """The explicit ``(n, p)`` gradient matrix the factors stand for.

    Per layer the columns are the weight gradient ``sum_t d_t a_t^T`` flattened row-major
    ``(d_out, d_in)``, then the bias gradient ``sum_t d_t`` if the layer has one: the order of
    ``nn.Linear.parameters()``.
    """
    cols = []
    for a, d, b in zip(inputs, output_grads, has_bias):
        a3, d3 = _as_3d(a), _as_3d(d)
        cols.append(torch.einsum("nto,nti->noi", d3, a3).flatten(1))
        if b:
            cols.append(d3.sum(1))
    return torch.cat(cols, dim=1)


def ghost_gram(inputs, output_grads, has_bias) -> torch.Tensor:
    """``sum_l (A_l A_l^T + b_l) * (D_l D_l^T)`` (and its (n, T, d) generalisation)."""
    total = None
    for a, d, b in zip(inputs, output_grads, has_bias):
        a3, d3 = _as_3d(a), _as_3d(d)
        term = torch.einsum("itc,jsc,ito,jso->ij", a3, a3, d3, d3)
        if b:
            ds = d3.sum(1)
            term = term + ds @ ds.T
        total = term if total is None else total + term
    return total


def ghost_dots(inputs, output_grads, weight_vectors, bias_vectors) -> torch.Tensor:
    """``sum_l sum_t d_t^T W_l a_t + (sum_t d_t)^T w_l`` for each of the k vectors."""
    total = None
    for a, d, w, wb in zip(inputs, output_grads, weight_vectors, bias_vectors):
        a3, d3 = _as_3d(a), _as_3d(d)
        term = torch.einsum("nto,oik,nti->nk", d3, w, a3)
        if wb is not None:
            term = term + d3.sum(1) @ wb
        total = term if total is None else total + term
    return total


def ghost_sq_norms(inputs, output_grads, has_bias) -> torch.Tensor:
    """Squared norms of the rows of :func:`per_sample_grads_from_factors`."""
    return per_sample_grads_from_factors(inputs, output_grads, has_bias).square().sum(1)


def ghost_products(inputs, output_grads, has_bias, weight_vectors, bias_vectors):
    """``(ghost_dots, ghost_sq_norms)``; ``bias_vectors`` packed (one per layer with a bias)."""
    it = iter(bias_vectors)
    per_layer = [next(it) if b else None for b in has_bias]
    return (ghost_dots(inputs, output_grads, weight_vectors, per_layer),
            ghost_sq_norms(inputs, output_grads, has_bias))


def ghost_alignment(inputs, output_grads, weight_vectors, bias_vectors) -> torch.Tensor:
    """Cosine of :func:`ghost_dots` with the norms of the gradients and of the vectors."""
    dots = ghost_dots(inputs, output_grads, weight_vectors, bias_vectors)
    has_bias = [wb is not None for wb in bias_vectors]
    gsq = ghost_sq_norms(inputs, output_grads, has_bias)
    vsq = sum(w.square().sum((0, 1)) for w in weight_vectors)
    vsq = vsq + sum(wb.square().sum(0) for wb in bias_vectors if wb is not None)
    return cosine_from_dots(dots, gsq, vsq)
