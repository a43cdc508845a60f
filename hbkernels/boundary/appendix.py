"""The paper's appendix analyses as measures: direction families (App. E), gradient coherence by
class, and per-class Hessian summaries (App. F). The scalar-product maps of App. D are the
``normalize=False`` option of :func:`~hbkernels.boundary.measures.gradient_alignment` and
:func:`~hbkernels.boundary.measures.alignment_map`.

Conventions (those of :mod:`hbkernels.boundary.measures`):

* Per-sample gradients use the model's own prediction as the label ("reinforcing" gradients,
  paper Eq. 1); the coherence heatmap orders them by the **true** label, as the reference's
  ``compute_grad`` does (reference_setup.md 5.3).
* Points whose gradient is round-off (:func:`~hbkernels.boundary.measures.roundoff_mask`) are
  left out of every max, mean and count, as in eps and G.
* Every result is a :class:`hbkernels.results.Result` (``save`` / ``Result.load``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import hbkernels as hbk

from ..checks import check_int, fail
from ..params import num_params
from ..results import Result, to_jsonable
from . import measures as M

__all__ = [
    "FAMILY_LABELS",
    "DirectionFamilies",
    "DirectionFamily",
    "GradientCoherence",
    "class_spectra_summary",
    "coherence_from_gram",
    "direction_families",
    "family_vectors",
    "gradient_coherence",
]

#: Figure labels of the four families of App. E (keys of :func:`family_vectors`).
FAMILY_LABELS = {"top": "top", "bottom": "bottom", "random_eigenvectors": "random eigvecs",
                 "random_directions": "random directions"}


# ----------------------------------------------------------------------------- App. E
def family_vectors(spectrum: M.Spectrum, k: int = 5, *, seed: int = 0
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The four direction families of App. E from a full spectrum.

    Args:
        spectrum: an exact :class:`~hbkernels.boundary.measures.Spectrum` with all ``p``
            eigenvectors (eigenvalues descending).
        k: vectors per family, ``1 <= k`` and ``3 k <= p``.
        seed: seed of the random eigenvector picks and the random directions.

    Returns:
        ``{"top": (V (p, k), eigenvalues (k,)), "bottom": ... (v_{-1} first: the smallest
        eigenvalue), "random_eigenvectors": k eigenvectors drawn from neither the top nor the
        bottom k (sorted by eigenvalue), "random_directions": (k unit Gaussian directions,
        None)}``.
    """
    fn = "hbk.boundary.family_vectors"
    if not isinstance(spectrum, M.Spectrum):
        fail(fn, "a Spectrum", spectrum, TypeError)
    V, p = spectrum.eigenvectors, spectrum.num_params
    if V is None or V.shape[1] != p:
        got = "none" if V is None else f"{V.shape[1]} of {p}"
        fail(fn, f"a spectrum with all {p} eigenvectors (compute_spectrum's exact path)", got,
             raw=True)
    check_int(fn, "k", k, 1)
    if 3 * k > p:
        fail(fn, f"3 k <= p = {p}", k)
    gen = torch.Generator().manual_seed(int(seed))
    pick = (torch.randperm(p - 2 * k, generator=gen)[:k] + k).sort().values
    ev = spectrum.eigenvalues
    return {
        "top": (V[:, :k], ev[:k]),
        "bottom": (V[:, -k:].flip(1), ev[-k:].flip(0)),
        "random_eigenvectors": (V[:, pick], ev[pick]),
        "random_directions": (M.random_directions(p, k, seed=seed, dtype=V.dtype), None),
    }


@dataclass
class DirectionFamily(Result):
    """Alignment of the training gradients with one family of directions.

    Attributes:
        name: the family (a key of :func:`family_vectors` or the caller's).
        mean_abs: ``(k,)`` ``mean_s |A_i(x_s)|`` over the kept training points.
        max_abs: ``(k,)`` ``max_s |A_i(x_s)|``.
        count_max: vectors with ``max_s |A_i| >= eps`` (the G count of the max rule).
        count_mean: vectors with ``mean_s |A_i| > eps`` (the G count of Eq. 6).
        eigenvalues: ``(k,)`` the vectors' eigenvalues, or None (random directions).
    """

    name: str
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    count_max: int
    count_mean: int
    eigenvalues: torch.Tensor | None = None

    @property
    def num_vectors(self) -> int:
        return int(self.max_abs.numel())

    def to_dict(self) -> dict:
        k = self.num_vectors
        return to_jsonable({"name": self.name, "num_vectors": k,
                "mean_abs": float(self.mean_abs.mean()), "max_abs": float(self.max_abs.max()),
                "mean_abs_per_vector": self.mean_abs, "max_abs_per_vector": self.max_abs,
                "count_max": self.count_max, "fraction_max": self.count_max / k,
                "count_mean": self.count_mean, "fraction_mean": self.count_mean / k,
                "eigenvalues": self.eigenvalues})


@dataclass
class DirectionFamilies(Result):
    """App. E in numbers: how each family of directions aligns with the training gradients.

    Attributes:
        families: ``{name: DirectionFamily}``.
        eps: the threshold the counts use (the paper's random-direction eps).
        eps_detail: its :class:`~hbkernels.boundary.measures.Threshold` (None when given).
        num_points: training points used (above round-off).
        num_roundoff: training points left out as round-off.
    """

    families: dict[str, DirectionFamily]
    eps: float
    eps_detail: M.Threshold | None = None
    num_points: int = 0
    num_roundoff: int = 0

    def to_dict(self) -> dict:
        return to_jsonable({"eps": self.eps, "num_points": self.num_points,
                            "num_roundoff": self.num_roundoff, "labels": "pred",
                            "families": {k: f.to_dict() for k, f in self.families.items()}})

    def report(self) -> str:
        """A Markdown table: one row per family."""
        head = ("| directions | mean_s abs(A), avg over vectors | max_s abs(A), max over vectors "
                "| vectors with max_s abs(A) >= eps | with mean_s abs(A) > eps |")
        intro = (f"eps = {self.eps:.4g} ({self.num_points} training points, predicted-label "
                 "gradients)\n")
        lines = [intro, head, "|---|---|---|---|---|"]
        for name, f in self.families.items():
            k = f.num_vectors
            lines.append(f"| {FAMILY_LABELS.get(name, name)} | {float(f.mean_abs.mean()):.4f} | "
                         f"{float(f.max_abs.max()):.4f} | {f.count_max}/{k} | {f.count_mean}/{k} |")
        return "\n".join(lines) + "\n"


def _as_family(fn: str, name: str, v: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    V, ev = (v if isinstance(v, tuple) else (v, None))
    if not isinstance(V, torch.Tensor) or V.dim() != 2:
        fail(fn, f"families[{name!r}] to be a (p, k) tensor or (tensor, eigenvalues)", V,
             TypeError)
    return V, ev


def _kept(norms: torch.Tensor, dtype: torch.dtype, factor: float | None) -> torch.Tensor:
    """The round-off rule of eps and G (all points for ``factor=None``)."""
    if factor is None:
        return torch.ones(norms.shape[0], dtype=torch.bool)
    return M.roundoff_mask(norms, dtype, factor=factor)


def direction_families(
    model: nn.Module,
    inputs: torch.Tensor,
    families: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    *,
    eps: float | None = None,
    num_directions: int = 5,
    eps_seed: int = 42,
    loss: str = "ce",
    roundoff_factor: float | None = M.ROUNDOFF_FACTOR,
    quiet: bool = True,
) -> DirectionFamilies:
    """Mean and max ``|A|`` of the training gradients per family of directions, and the count of
    vectors above eps (App. E: only the top eigenvectors align), from one per-sample pass.

    Args:
        model: the classifier.
        inputs: ``(n, ...)`` training inputs (predicted-label gradients).
        families: ``{name: (p, k)}`` or ``{name: ((p, k), eigenvalues (k,))}``, e.g.
            :func:`family_vectors`.
        eps: the threshold; None computes the paper's (``num_directions`` random directions,
            seed ``eps_seed``) in the same pass.
        num_directions, eps_seed: the threshold's directions.
        loss: per-sample loss.
        roundoff_factor: the round-off rule (None keeps every point).
        quiet: no progress bar.

    Returns:
        :class:`DirectionFamilies`.
    """
    fn = "hbk.boundary.direction_families"
    if not isinstance(families, Mapping) or not families:
        fail(fn, "a non-empty dict of direction families", families, TypeError)
    if "__eps__" in families:
        fail(fn, "family names other than '__eps__'", "__eps__", raw=True)
    dtype, device = M._model_dtype(model), M._model_device(model)
    parsed = {str(k): _as_family(fn, str(k), v) for k, v in families.items()}
    vsets = {k: V.to(device=device, dtype=dtype) for k, (V, _) in parsed.items()}
    if eps is None:
        vsets["__eps__"] = M.random_directions(num_params(model), num_directions, eps_seed,
                                               dtype=dtype).to(device)
    prod = hbk.per_sample_products(model, inputs.to(device=device, dtype=dtype), norms=True,
                                   vectors=vsets, labels="pred", loss=loss, quiet=quiet)
    norms = prod.norms.detach().cpu()
    keep = _kept(norms, dtype, roundoff_factor)
    if not keep.any():
        fail(fn, "at least one training gradient above round-off", "none", raw=True)
    detail = None
    if eps is None:
        tol = None if roundoff_factor is None else M.roundoff_tolerance(norms, dtype,
                                                                        factor=roundoff_factor)
        detail = M._threshold(prod.alignment["__eps__"].detach().cpu(), num_directions, eps_seed,
                              keep=keep, tol=tol)
        eps = detail.eps
    out = {}
    for name, (_, ev) in parsed.items():
        a = prod.alignment[name].detach().cpu().double()[keep].abs()
        mean, mx = a.mean(0), a.amax(0)
        out[name] = DirectionFamily(name, mean, mx, int((mx >= eps).sum()),
                                    int((mean > eps).sum()),
                                    None if ev is None else torch.as_tensor(ev).double().cpu())
    return DirectionFamilies(out, float(eps), detail, int(keep.sum()), int((~keep).sum()))


# ----------------------------------------------------------------------------- coherence
@dataclass
class GradientCoherence(Result):
    """Cosines between the training gradients, ordered by class, and their class-block means.

    Attributes:
        block_means: ``(C, C)`` mean cosine between the gradients of class ``a`` (rows) and
            class ``b`` (the diagonal blocks leave out ``i = j``; NaN for a block with no pair).
        classes: the ``C`` classes (sorted).
        counts: training points per class (those above round-off).
        order: ``(n,)`` the sample indices sorted by class (stable).
        sorted_labels: ``(n,)`` the class of each row of ``cosine``.
        cosine: ``(n, n)`` cosines in ``order`` (0 for a round-off gradient), or None when not
            kept (:func:`~hbkernels.boundary.measures.analyze` keeps only the block means).
        gradient_labels: ``"pred"`` or ``"true"``: the labels of the per-sample losses.
        num_roundoff: points whose gradient is round-off (left out of the means).
    """

    block_means: torch.Tensor
    classes: list[int]
    counts: list[int]
    order: torch.Tensor = field(repr=False)
    sorted_labels: torch.Tensor = field(repr=False)
    cosine: torch.Tensor | None = field(default=None, repr=False)
    gradient_labels: str = "pred"
    num_roundoff: int = 0

    @property
    def within_class(self) -> float:
        """Mean over classes of the diagonal block means (NaN blocks skipped)."""
        d = self.block_means.diagonal()
        d = d[torch.isfinite(d)]
        return float(d.mean()) if d.numel() else float("nan")

    @property
    def between_class(self) -> float:
        """Mean of the off-diagonal block means (NaN for one class)."""
        C = self.block_means.shape[0]
        off = self.block_means[~torch.eye(C, dtype=torch.bool)]
        off = off[torch.isfinite(off)]
        return float(off.mean()) if off.numel() else float("nan")

    def to_dict(self) -> dict:
        return to_jsonable({
            "block_means": self.block_means, "classes": self.classes, "counts": self.counts,
            "within_class": self.within_class, "between_class": self.between_class,
            "gradient_labels": self.gradient_labels, "ordered_by": "true label",
            "num_roundoff": self.num_roundoff})

    def report(self) -> str:
        """One line: within- and between-class mean cosines."""
        return (f"gradient coherence ({self.gradient_labels}-label gradients, by true class): "
                f"within-class mean cosine {self.within_class:.3f}, between-class "
                f"{self.between_class:.3f}")


def coherence_from_gram(
    gram: torch.Tensor,
    targets: torch.Tensor,
    *,
    norms: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    keep_matrix: bool = True,
    gradient_labels: str = "pred",
) -> GradientCoherence:
    """:class:`GradientCoherence` from the Gram ``K = G G^T`` of the per-sample gradients.

    Args:
        gram: ``(n, n)``.
        targets: ``(n,)`` integer true labels (the order of the rows).
        norms: ``(n,)`` gradient norms (default ``sqrt(diag K)``).
        keep: ``(n,)`` bool, points above round-off (None: every non-zero gradient).
        keep_matrix: keep the ``(n, n)`` ordered cosines (for the heatmap).
        gradient_labels: recorded: the labels the gradients were taken with.

    Returns:
        :class:`GradientCoherence`.
    """
    fn = "hbk.boundary.coherence_from_gram"
    n = targets.shape[0] if isinstance(targets, torch.Tensor) else -1
    if n < 0 or targets.is_floating_point() or targets.dim() != 1:
        fail(fn, "integer class targets of shape (n,)", targets, TypeError)
    if not isinstance(gram, torch.Tensor):
        fail(fn, "gram to be a torch.Tensor", gram, TypeError)
    if gram.shape != (n, n):
        fail(fn, f"a ({n}, {n}) Gram matrix matching targets", gram)
    K = gram.detach().double().cpu()
    nrm = K.diagonal().clamp_min(0).sqrt() if norms is None else norms.detach().double().cpu()
    ok = nrm > 0 if keep is None else (keep.cpu() & (nrm > 0))
    inv = torch.where(ok, 1.0 / nrm.clamp_min(1e-300), 0.0)
    cos = (K * inv[:, None] * inv[None, :]).clamp(-1, 1)
    y = targets.detach().cpu().long()
    order = torch.sort(y, stable=True).indices
    classes = sorted(int(c) for c in torch.unique(y))
    Y = (y[:, None] == torch.tensor(classes)[None, :]).double() * ok.double()[:, None]
    cnt = Y.sum(0)
    total = Y.T @ cos @ Y  # (C, C) sums over the kept pairs of each block
    pairs = cnt[:, None] * cnt[None, :]
    total -= torch.diag(Y.T @ cos.diagonal())  # leave out i = j in the diagonal blocks
    pairs -= torch.diag(cnt)
    means = torch.where(pairs > 0, total / pairs.clamp_min(1), float("nan"))
    mat = cos.index_select(0, order).index_select(1, order) if keep_matrix else None
    return GradientCoherence(means, classes, [int(c) for c in cnt], order, y[order], mat,
                             gradient_labels, int((~ok).sum()))


def gradient_coherence(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    labels: str = "pred",
    loss: str = "ce",
    roundoff_factor: float | None = M.ROUNDOFF_FACTOR,
    keep_matrix: bool = True,
    quiet: bool = True,
) -> GradientCoherence:
    """The cosine Gram of the training gradients ordered by true class (gradient coherence).

    One per-sample pass gives the Gram ``G G^T`` and the norms
    (:func:`hbkernels.per_sample_products`); the ``(n, p)`` gradient matrix is never formed.

    Args:
        model: the classifier.
        data: ``(X (n, ...), y (n,))``; ``y`` orders the rows (and is the label of the losses
            for ``labels="true"``).
        labels: ``"pred"`` (the reference's ``compute_grad``: reinforcing gradients) or
            ``"true"``.
        loss: per-sample loss.
        roundoff_factor: the round-off rule (None keeps every non-zero gradient).
        keep_matrix: keep the ``(n, n)`` cosines (for the heatmap,
            :func:`~hbkernels.boundary.plots.plot_gradient_coherence`).
        quiet: no progress bar.

    Returns:
        :class:`GradientCoherence`.
    """
    fn = "hbk.boundary.gradient_coherence"
    if labels not in ("pred", "true"):
        fail(fn, "labels 'pred' or 'true'", labels)
    X, y = M._data_as(data, model)
    kw: dict[str, Any] = {"labels": labels, "loss": loss, "quiet": quiet}
    if labels == "true":
        kw["targets"] = y
    prod = hbk.per_sample_products(model, X, norms=True, gram=True, **kw)
    norms = prod.norms.detach().cpu()
    keep = _kept(norms, M._model_dtype(model), roundoff_factor)
    return coherence_from_gram(prod.gram, y.cpu(), norms=norms, keep=keep,
                               keep_matrix=keep_matrix, gradient_labels=labels)


# ----------------------------------------------------------------------------- App. F
def class_spectra_summary(per_class: Mapping[str, M.Spectrum], k: int = 5) -> dict:
    """``{class: {"lambda_max", "trace", "top_eigenvalues" (k), "exact"}}`` of per-class spectra
    (:func:`~hbkernels.boundary.measures.class_spectra`), JSON-ready."""
    return {str(c): {"lambda_max": s.lambda_max, "trace": s.trace,
                     "top_eigenvalues": [float(v) for v in s.eigenvalues[:k]], "exact": s.exact}
            for c, s in per_class.items()}
