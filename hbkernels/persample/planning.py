"""The cost model: per factor pair the ghost form or blocked materialisation, and block sizes.

For a pair with ``T`` positions, ``d = d_in + d_out`` and ``p_l = d_in d_out`` weights, the
per-sample costs (flops up to constants) of the products one pass computes are

=========  =================================  ===================================
product    ghost                              materialised (after forming ``g_l``)
=========  =================================  ===================================
norms      ``T^2 d``                          ``0`` (the norm of ``g_l`` is free)
k vectors  ``T p_l k + T^2 d``                ``p_l k``
Gram       ``n T^2 d`` (over n partners)      ``n p_l``
=========  =================================  ===================================

and forming ``g_l`` costs ``T p_l``. For ``T = 1`` and vectors the two forms cost the same
flops; the ghost form wins when its ``(n, min(d_in, d_out), k)`` temporary is smaller than
``p_l`` (ghost ``min(d_in, d_out) k`` against ``p_l``). A pass of several products adds their
costs (forming ``g_l`` once). One rule per product, so one pass over many products picks what
the separate calls would pick when they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .capture import Pair

__all__ = ["Work", "block_size", "choose_forms"]


@dataclass
class Work:
    """What one pass computes: norms, dots with ``k`` vectors, the Gram, the materialised rows.

    Attributes:
        norms: squared norms (also needed by every cosine).
        k: total number of vectors over all vector sets (0: none).
        gram: the ``(n, n)`` Gram (or per-class Grams).
        rows: the full per-sample gradient rows (``per_sample_grads``): everything dense.
        gtu: columns of products ``G V`` and ``G^T U`` (the empirical Fisher).
    """

    norms: bool = False
    k: int = 0
    gram: bool = False
    rows: bool = False
    gtu: int = 0
    n: int = 1  # samples (set by the engine)


def _costs(q: Pair, w: Work) -> tuple[float, float]:
    T, pw, d = q.T, q.p_weight, q.d_in + q.d_out
    ghost = use = 0.0
    formed = False
    if w.norms and not w.k:
        ghost += T * T * d
        formed = True
    if w.k:
        if T == 1:
            ghost += min(q.d_in, q.d_out) * w.k
        else:
            ghost += T * pw * w.k + T * T * d
            use += pw * w.k
        formed = True
    if w.gram:
        ghost += w.n * T * T * d
        use += w.n * pw
        formed = True
    if w.gtu:  # G^T U and G v: the ghost form is the factored product, the same flops
        ghost += T * pw * w.gtu
        use += pw * w.gtu
        formed = True
    return ghost, (T * pw if formed else 0.0) + use


def choose_forms(pairs: list[Pair], work: Work, strategy: str) -> list[bool]:
    """Per pair: True for the ghost form, False for blocked materialisation."""
    if work.rows:
        return [False] * len(pairs)
    if strategy != "auto":
        return [strategy == "ghost"] * len(pairs)
    out = []
    for q in pairs:
        ghost, mat = _costs(q, work)
        out.append(ghost <= mat)
    return out


def block_size(n: int, budget: int, elem: int, act_elems: float, factor_elems: int,
               fallback_elems: int, dense_width: int, user: int | None) -> int:
    """Samples per block: the user's, or so that the estimated working set fits ``budget``.

    Per sample: the forward graph (about 4x the recorded layer inputs and outputs), the factors
    (twice: capture and group slices), the fallback gradients (vmap temporaries) and
    ``dense_width`` materialised gradient columns.
    """
    if user is not None:
        return min(n, user)
    per_sample = 4 * act_elems + 2 * factor_elems + 4 * fallback_elems + dense_width + 16
    return min(n, max(1, int(budget // (per_sample * elem))))
