"""The public per-sample functions; all share one keyword-only option set.

Options (every function):

* ``labels``: ``"pred"`` (default: the model's own prediction), ``"true"`` (with ``targets``)
  or a tensor with one row per sample;
* ``targets``: the true labels for ``labels="true"``;
* ``loss``: ``"ce"`` (default), ``"nll"``, ``"mse"`` (one-hot of class labels, mean over the
  C outputs), ``"bce"``, an ``nn.Module`` loss or a callable ``loss(outputs, targets)``; each
  sample's gradient is that of its own loss (a batch of one);
* ``forward``: ``forward(model, inputs) -> outputs`` for models that need their own call;
* ``block_size``, ``memory_budget`` (bytes of working memory, default 512 MiB, outputs not
  counted), ``strategy`` (``"auto"``, ``"ghost"``, ``"materialise"``), ``quiet``,
  ``check_deterministic`` (refuse active dropout).

``inputs`` is a tensor ``(n, ...)``, a tuple or a dict of tensors with ``n`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from ..checks import check_int, fail
from ..results import Result
from .engine import Engine
from .options import PerSampleOptions, parse_options
from .planning import Work
from .products import Store, VectorSet, add_gtu, gram_of, run_pass, unscale_gram_

__all__ = [
    "PerSampleProducts",
    "gradient_alignment",
    "gradient_covariance_eigs",
    "gradient_gram",
    "gradient_norms",
    "per_sample_grads",
    "per_sample_products",
]


def _check_vectors(fn: str, eng: Engine, vectors: Any, name: str = "vectors"):
    if not isinstance(vectors, torch.Tensor):
        fail(fn, f"{name} to be a torch.Tensor", vectors, TypeError)
    if not vectors.is_floating_point():
        fail(fn, f"{name} of a floating-point dtype", vectors.dtype, TypeError, raw=True)
    V = vectors.unsqueeze(1) if vectors.dim() == 1 else vectors
    if V.dim() != 2 or V.shape[0] != eng.p or V.shape[1] < 1:
        fail(fn, f"{name} of shape ({eng.p}, k) or ({eng.p},)", f"{tuple(vectors.shape)}",
             raw=True)
    if V.dtype != eng.dtype:
        # Another dtype (e.g. float64 Lanczos eigenvectors of a float32 model): only cosines
        # leave this module, so each column is first scaled by a power of two to a peak near 1
        # (no underflow or overflow in the cast), then cast.
        peak = V.abs().amax(0)
        exp = torch.where(peak > 0, torch.frexp(peak.double())[1], 0).to(V.dtype)
        V = torch.ldexp(V, -exp).to(eng.dtype)
    return V.to(eng.device)


def _norms(gsq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (gsq.double().sqrt() / scale).to(dtype)  # not in place: gsq may be float64


def _cosines(dots: torch.Tensor, gsq: torch.Tensor, vs: VectorSet) -> torch.Tensor:
    from .. import ops

    return ops.cosine_from_dots(dots, gsq, vs.vsq)


# ----------------------------------------------------------------------------- functions
def per_sample_grads(model: nn.Module, inputs: Any,
                     **options: Unpack[PerSampleOptions]) -> torch.Tensor:
    """The materialised per-sample gradient matrix ``G``, computed in sample blocks.

    Args:
        model: any ``nn.Module``.
        inputs: ``(n, ...)``, a tuple or a dict of tensors with ``n`` rows, on the model's
            device.
        **options: the shared keyword-only options (:class:`PerSampleOptions`, the module
            docstring).

    Returns:
        ``(n, p)`` in the model's dtype; row i is the gradient of sample i's own loss in
        ``model.parameters()`` order (trainable parameters only).
    """
    fn = "hbk.per_sample_grads"
    opts = parse_options(fn, options)
    eng = Engine(fn, model, inputs, opts, Work(rows=True), scale=False)
    out = torch.empty(eng.n, eng.p, dtype=eng.dtype, device=eng.device)
    for s, e in eng.blocks():
        eng.fill(eng.capture(s, e), out[s:e])
    return out


def gradient_norms(model: nn.Module, inputs: Any,
                   **options: Unpack[PerSampleOptions]) -> torch.Tensor:
    """Euclidean norms ``|g_i|`` of the per-sample gradients, never forming ``G``.

    Computed on each sample's gradient scaled by a power of two and unscaled in float64, so
    gradients of size 1e-26 in float32 give their norms, not 0.

    Args: as in :func:`per_sample_grads`.

    Returns:
        ``(n,)`` in the model's dtype.
    """
    fn = "hbk.gradient_norms"
    opts = parse_options(fn, options)
    eng = Engine(fn, model, inputs, opts, Work(norms=True))
    r = run_pass(eng, norms=True)
    return _norms(r.gsq, r.scale, eng.dtype)


def gradient_alignment(model: nn.Module, inputs: Any, vectors: torch.Tensor,
                       **options: Unpack[PerSampleOptions]) -> torch.Tensor:
    """Cosine alignment ``C[i, j] = <g_i, v_j> / (|g_i| |v_j|)``, never forming ``G``.

    Per factor pair, dots and squared norms come from one ghost kernel call per block or from
    the pair's materialised block times the matching rows of ``V``, whichever is cheaper; other
    parameters use ``torch.func`` per-sample gradients. Scale invariant: each sample's factors
    are scaled by a power of two first, so no underflow in float32.

    Args:
        model, inputs, **options: as in :func:`per_sample_grads`.
        vectors: ``(p, k)`` (or ``(p,)``) in ``model.parameters()`` order, the parameters'
            dtype and device.

    Returns:
        ``(n, k)`` (``(n,)`` for 1-D ``vectors``). A zero gradient (or a zero vector) gives 0.
    """
    fn = "hbk.gradient_alignment"
    opts = parse_options(fn, options)
    k = vectors.shape[1] if isinstance(vectors, torch.Tensor) and vectors.dim() == 2 else 1
    eng = Engine(fn, model, inputs, opts, Work(norms=True, k=k))
    V = _check_vectors(fn, eng, vectors)
    vs = VectorSet(eng, V)
    r = run_pass(eng, vectors=vs)
    C = _cosines(r.dots, r.gsq, vs)
    return C[:, 0] if vectors.dim() == 1 else C


def gradient_gram(model: nn.Module, inputs: Any,
                  **options: Unpack[PerSampleOptions]) -> torch.Tensor:
    """Gram matrix ``K = G G^T`` of the per-sample gradients, never forming ``G``.

    Ghost pairs contribute ``(A A^T + b) * (D D^T)`` (and its T > 1 form) through
    :func:`hbkernels.ghost_gram`; materialised pairs and fallback parameters through
    :func:`hbkernels.gram` of their columns. When the compact factors of all n samples fit
    ``memory_budget`` each kernel runs once; otherwise block pairs are recomputed.

    Args: as in :func:`per_sample_grads`.

    Returns:
        ``(n, n)``, symmetric.
    """
    fn = "hbk.gradient_gram"
    opts = parse_options(fn, options)
    eng = Engine(fn, model, inputs, opts, Work(gram=True))
    return run_pass(eng, gram=True).gram


def gradient_covariance_eigs(model: nn.Module, inputs: Any, k: int,
                             **options: Unpack[PerSampleOptions]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of the gradient covariance ``Sigma = G^T G / n``, never forming ``G``.

    ``Sigma`` and ``K / n = G G^T / n`` share their nonzero eigenvalues. With ``K u = n lambda u``
    (``|u| = 1``, a float64 ``eigh`` of the ``(n, n)`` Gram) the eigenvector is
    ``v = G^T u / sqrt(n lambda)``, assembled from the factors or the materialised columns.

    Args:
        k: number of eigenpairs, ``1 <= k <= n``.
        Others: as in :func:`per_sample_grads`.

    Returns:
        ``(eigenvalues (k,) descending, eigenvectors (p, k))`` in the model's dtype, columns of
        unit norm in ``model.parameters()`` order. Eigenvalues at or below
        ``n * eps * lambda_max`` (the rank of ``G`` is at most n) are returned as 0 with a zero
        column, since ``G`` does not determine those directions.
    """
    fn = "hbk.gradient_covariance_eigs"
    opts = parse_options(fn, options)
    check_int(fn, "k", k, 1)
    eng = Engine(fn, model, inputs, opts, Work(gram=True))
    if k > eng.n:
        fail(fn, f"k <= n = {eng.n}", k)
    r = run_pass(eng, gram=True)
    n = eng.n
    evals, evecs = torch.linalg.eigh(r.gram.double() / n)
    evals, U = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
    tol = n * torch.finfo(eng.dtype).eps * max(float(evals[0]), 0.0)
    keep = evals > tol
    col = torch.where(keep, 1.0 / (n * evals).clamp_min(1e-300).sqrt(), 0.0)
    # G = S^-1 G_s (rows scaled by s_i): G^T u = G_s^T (S^-1 u).
    U = (U * col / r.scale[:, None]).to(eng.dtype)
    V = torch.zeros(eng.p, k, dtype=eng.dtype, device=eng.device)
    if r.store is not None:
        add_gtu(eng, r.store, r.store.dense, U, V)
    else:
        for s, e in eng.blocks():
            f = eng.capture(s, e)
            add_gtu(eng, f, eng.dense(f) if eng.layout.width else None, U[s:e], V)
    return torch.where(keep, evals, 0.0).to(eng.dtype), V


# ----------------------------------------------------------------------------- one pass
@dataclass
class PerSampleProducts(Result):
    """What :func:`per_sample_products` computed (fields not asked for are None).

    Attributes:
        norms: ``(n,)`` gradient norms.
        alignment: ``{name: (n, k)}`` cosines with each vector set.
        gram: ``(n, n)`` Gram.
        class_gram: ``{class: (n_c, n_c)}`` Gram of the samples whose label is the class.
        class_index: ``{class: (n_c,)}`` those samples' indices.
        labels: ``(n, ...)`` the targets used (the predictions for ``labels="pred"``).
    """

    norms: torch.Tensor | None = None
    alignment: dict[str, torch.Tensor] | None = None
    gram: torch.Tensor | None = None
    class_gram: dict[int, torch.Tensor] | None = None
    class_index: dict[int, torch.Tensor] | None = None
    labels: torch.Tensor | None = None


def per_sample_products(model: nn.Module, inputs: Any, *, norms: bool = False,
                        vectors: torch.Tensor | dict[str, torch.Tensor] | None = None,
                        gram: bool = False, class_gram: bool = False,
                        **options: Unpack[PerSampleOptions]) -> PerSampleProducts:
    """Any subset of norms, alignments with several vector sets, Gram and per-class Grams from
    one capture per sample block (one pass instead of one per product).

    Args:
        model, inputs, **options: as in :func:`per_sample_grads`.
        norms: the gradient norms.
        vectors: a ``(p, k)`` tensor (key ``"vectors"`` in the result) or ``{name: (p, k_name)}``
            (eigenvectors and random directions together): cosines with each.
        gram: the ``(n, n)`` Gram.
        class_gram: per class (integer labels), the Gram of its samples.

    Returns:
        :class:`PerSampleProducts`.
    """
    fn = "hbk.per_sample_products"
    opts = parse_options(fn, options)
    sets: dict[str, Any] = {}
    if vectors is not None:
        sets = {"vectors": vectors} if isinstance(vectors, torch.Tensor) else vectors
        if not isinstance(sets, dict) or not sets:
            fail(fn, "vectors to be a (p, k) tensor or a non-empty dict of them", vectors,
                 TypeError)
    ks = {nm: (v.shape[1] if isinstance(v, torch.Tensor) and v.dim() == 2 else 1)
          for nm, v in sets.items()}
    work = Work(norms=norms or bool(sets), k=sum(ks.values()), gram=gram or class_gram)
    eng = Engine(fn, model, inputs, opts, work)
    mats = [_check_vectors(fn, eng, v, f"vectors[{nm!r}]") for nm, v in sets.items()]
    vs = None
    if mats:
        vs = VectorSet(eng, mats[0] if len(mats) == 1 else torch.cat(mats, 1))
    r = run_pass(eng, norms=norms, vectors=vs, gram=gram, keep_store=class_gram)
    out = PerSampleProducts(labels=torch.cat(r.targets))
    if norms:
        out.norms = _norms(r.gsq, r.scale, eng.dtype)
    if vs is not None:
        C = _cosines(r.dots, r.gsq, vs)
        out.alignment, c0 = {}, 0
        for (nm, v), m in zip(sets.items(), mats):
            c = C[:, c0 : c0 + m.shape[1]]
            out.alignment[nm] = c[:, 0] if v.dim() == 1 else c
            c0 += m.shape[1]
    if gram:
        out.gram = r.gram
    if class_gram:
        out.class_gram, out.class_index = _class_grams(fn, eng, r, out.labels)
    return out


def _class_grams(fn: str, eng: Engine, r, labels: torch.Tensor):
    if labels.is_floating_point() or labels.dim() != 1:
        fail(fn, "integer class labels (one per sample) for class_gram", labels, raw=False)
    grams, index = {}, {}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if r.gram is not None:
            grams[c] = r.gram.index_select(0, idx).index_select(1, idx)
        elif r.store is not None:
            st: Store = r.store.select(idx)
            K = gram_of(eng, st.A, st.D, st.dense, idx.numel())
            grams[c] = unscale_gram_(K, st.scale, st.scale)
        else:  # the factors did not fit the budget: one more pass for the full Gram
            grams[c] = None
        index[int(c)] = idx
    missing = [c for c, K in grams.items() if K is None]
    if missing:
        full = run_pass(eng, gram=True).gram
        for c in missing:
            grams[c] = full.index_select(0, index[c]).index_select(1, index[c])
    return {int(c): K for c, K in grams.items()}, index
