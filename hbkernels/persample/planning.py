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

Rates (measured, 1 thread, float32, n = 512 blocks; ``bench/bench_persample.py``): a
convolution's materialised gradient by its rule's direct form (a grouped convolution backward)
runs 5-17x faster per flop than ``unfold`` + ``bmm`` (LeNet-5 conv1: 0.16 s against 0.83 s), so
for pairs with a direct form the forming cost is ``T p_l`` times :data:`DIRECT_RATE`; the
ghost form of a convolution needs the unfolded patches, a memory-bound copy of
``T d_in`` elements costing about :data:`UNFOLD_COST` flops each.
"""

from __future__ import annotations

from dataclasses import dataclass

from .capture import Pair

__all__ = ["BLOCK_BYTES", "DIRECT_RATE", "MIN_BLOCK", "UNFOLD_COST", "Work", "block_size",
           "choose_forms"]

BLOCK_BYTES = 48 * 2**20
"""Working set of one sample block beyond which blocks get no faster (bytes)."""
MIN_BLOCK = 32
"""Samples per block at least, where the budget allows (GEMM efficiency)."""

DIRECT_RATE = 0.2
"""Cost per flop of a direct (grouped-convolution) weight gradient relative to ``bmm``."""
UNFOLD_COST = 16.0
"""Flop-equivalents per element of the unfolded patches (``im2col`` + the contiguous copy)."""


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


def _costs(q: Pair, w: Work, direct: bool = False) -> tuple[float, float]:
    T, pw, d = q.T, q.p_weight, q.d_in + q.d_out
    ghost = T * q.d_in * UNFOLD_COST if direct and T > 1 else 0.0
    use = 0.0
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
    form = T * pw * (DIRECT_RATE if direct else 1.0)
    return ghost, (form if formed else 0.0) + use


def choose_forms(pairs: list[Pair], work: Work, strategy: str,
                 direct: list[bool] | None = None) -> list[bool]:
    """Per pair: True for the ghost form, False for blocked materialisation.

    ``direct[j]``: pair j's rule forms its gradient directly (:data:`DIRECT_RATE`)."""
    if work.rows:
        return [False] * len(pairs)
    if strategy != "auto":
        return [strategy == "ghost"] * len(pairs)
    direct = direct or [False] * len(pairs)
    out = []
    for q, dr in zip(pairs, direct):
        ghost, mat = _costs(q, work, dr)
        out.append(ghost <= mat)
    return out


def block_size(n: int, budget: int, elem: int, act_elems: float, factor_elems: int,
               fallback_elems: int, dense_width: int, user: int | None) -> int:
    """Samples per block: the user's, or so that the estimated working set fits ``budget``.

    Per sample: the forward graph (about 4x the recorded layer inputs and outputs), the factors
    (twice: capture and group slices), the fallback gradients (vmap temporaries) and
    ``dense_width`` materialised gradient columns. Within the budget, blocks are also capped
    at a working set of :data:`BLOCK_BYTES` (at least :data:`MIN_BLOCK` samples): measured on
    the CNN, LeNet-5 and ResNet at n = 1024 (``bench/bench_persample.py``), blocks of 64-256
    samples ran 10-40% faster than one block of 1024 (fresh large allocations page-fault and
    leave the caches) and need a fraction of the memory.
    """
    if user is not None:
        return min(n, user)
    per_sample = (4 * act_elems + 2 * factor_elems + 4 * fallback_elems + dense_width + 16) * elem
    cap = max(MIN_BLOCK, int(BLOCK_BYTES // per_sample))
    return min(n, cap, max(1, int(budget // per_sample)))
