"""Readings of a Hessian spectrum from the related work: its density type, its bulk and outliers.

**Spectral-density type** (after arXiv:2504.17618, whose exact constants are not in our
sources; the rule and thresholds below are ours, stated and tested). A spectrum is given as
eigenvalues (exact, or a top/bottom part) or as an SLQ density (nodes with weights summing to
one). With ``s = max |lambda|``:

* the *zero band* is ``|lambda| <= zero_rtol * s`` (default ``1e-3``; ``zero_atol`` adds an
  absolute floor); ``zero_share`` is the share of the spectrum inside it;
* the *positive share* ``r = M+ / (M+ + M-)``, with ``M+ = sum w max(lambda, 0)`` and
  ``M- = sum w max(-lambda, 0)`` over the spectrum outside the zero band;
* **QS** (quasi-singular): ``s`` is at most ``zero_atol``, or fewer than ``min_active_share``
  (default 1 %) of the spectrum lies outside the zero band: the Hessian is numerically of very
  low rank, and reading eigenvalues as curvature is unreliable;
* else **MP** (mainly positive) when ``r >= positive_share`` (default 2/3), **MN** (mainly
  negative) when ``r <= 1 - positive_share``, and **mixed** otherwise.

Hessian-based generalisation measures (G, trace, lambda_max) are read as intended only for MP
spectra; ``SpectralType.applicable`` says so.

**Bulk and outliers** (Sagun et al., arXiv:1706.04454): the outlier count by the gap rule of
:func:`hbkernels.boundary.measures.count_outliers`, the bulk's edge and width, and how the
count compares with the number of classes ``C`` (Sagun et al. and later work relate it to
``C`` or ``C - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_float, check_int, fail
from ..results import Result

__all__ = ["SPECTRAL_TYPES", "BulkOutliers", "SpectralType", "bulk_outliers", "spectral_type"]

SPECTRAL_TYPES = ("MP", "MN", "QS", "mixed")


def _as_array(fn: str, name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        fail(fn, f"{name} to be a 1-D sequence of numbers", x, TypeError)
    if arr.size == 0:
        fail(fn, f"{name} to be non-empty", "an empty sequence", raw=True)
    if not np.all(np.isfinite(arr)):
        fail(fn, f"finite {name}", f"{int((~np.isfinite(arr)).sum())} non-finite value(s)", raw=True)
    return arr


@dataclass
class SpectralType(Result):
    """The density type of a spectrum and the numbers that decided it (module docstring)."""

    type: str
    positive_share: float
    zero_share: float
    scale: float
    positive_mass: float
    negative_mass: float
    thresholds: dict

    @property
    def applicable(self) -> bool:
        """Whether Hessian-based measures are read as intended (an MP spectrum)."""
        return self.type == "MP"


def spectral_type(eigenvalues, weights=None, *, zero_rtol: float = 1e-3, zero_atol: float = 0.0,
                  positive_share: float = 2 / 3, min_active_share: float = 0.01) -> SpectralType:
    """Classify a spectrum as MP, MN, QS or mixed (rule in the module docstring).

    Args:
        eigenvalues: ``(m,)`` eigenvalues, or SLQ nodes.
        weights: ``(m,)`` non-negative weights (an SLQ density; normalised here); None gives
            every eigenvalue the weight ``1/m``.
        zero_rtol, zero_atol: the zero band ``|lambda| <= max(zero_rtol * s, zero_atol)``.
        positive_share: MP needs at least this share of the non-zero mass to be positive
            (MN at most ``1 - positive_share``), in ``(0.5, 1]``.
        min_active_share: below this share outside the zero band the spectrum is QS.

    Returns:
        :class:`SpectralType`.
    """
    fn = "hbk.boundary.spectral_type"
    lam = _as_array(fn, "eigenvalues", eigenvalues)
    if weights is None:
        w = np.full(lam.size, 1.0 / lam.size)
    else:
        w = _as_array(fn, "weights", weights)
        if w.shape != lam.shape or np.any(w < 0) or w.sum() <= 0:
            fail(fn, f"{lam.size} non-negative weights with a positive sum", f"{w.size} weights "
                 f"(min {w.min():.3g}, sum {w.sum():.3g})", raw=True)
        w = w / w.sum()
    check_float(fn, "zero_rtol", zero_rtol, 0.0, 1.0)
    check_float(fn, "zero_atol", zero_atol, 0.0)
    check_float(fn, "positive_share", positive_share, 0.5, 1.0, lo_open=True)
    check_float(fn, "min_active_share", min_active_share, 0.0, 1.0)
    scale = float(np.abs(lam).max())
    band = max(zero_rtol * scale, zero_atol)
    zero = np.abs(lam) <= band
    zero_share = float(w[zero].sum())
    pos = float((w * np.clip(lam, 0, None))[~zero].sum())
    neg = float((w * np.clip(-lam, 0, None))[~zero].sum())
    share = pos / (pos + neg) if pos + neg > 0 else float("nan")
    if scale <= zero_atol or 1.0 - zero_share < min_active_share:
        kind = "QS"
    elif share >= positive_share:
        kind = "MP"
    elif share <= 1.0 - positive_share:
        kind = "MN"
    else:
        kind = "mixed"
    thresholds = {"zero_rtol": zero_rtol, "zero_atol": zero_atol, "positive_share": positive_share,
                  "min_active_share": min_active_share}
    return SpectralType(kind, share, zero_share, scale, pos, neg, thresholds)


@dataclass
class BulkOutliers(Result):
    """Bulk-and-outliers split of a spectrum (Sagun et al.)."""

    num_outliers: int
    num_classes: int | None
    bulk_edge: float
    bulk_width: float
    outlier_values: list
    gap_fraction: float

    @property
    def matches_classes(self) -> bool | None:
        """Whether the outlier count is ``C`` or ``C - 1`` (None without ``num_classes``)."""
        if self.num_classes is None:
            return None
        return self.num_outliers in (self.num_classes - 1, self.num_classes)


def bulk_outliers(eigenvalues, num_classes: int | None = None, *,
                  gap_fraction: float = 0.05) -> BulkOutliers:
    """Split a spectrum into a bulk and outliers.

    Args:
        eigenvalues: ``(m,)``, any order (an exact spectrum; a top-k part gives the outliers
            only, its "bulk" is then the smallest computed values).
        num_classes: ``C``, to compare the outlier count with.
        gap_fraction: the gap rule of :func:`~hbkernels.boundary.measures.count_outliers`.

    Returns:
        :class:`BulkOutliers`; ``bulk_width`` is the spread ``max - min`` of the eigenvalues
        at or below the bulk edge.
    """
    from .measures import count_outliers

    fn = "hbk.boundary.bulk_outliers"
    lam = np.sort(_as_array(fn, "eigenvalues", eigenvalues))
    if num_classes is not None:
        check_int(fn, "num_classes", num_classes, 1)
    out = count_outliers(lam, gap_fraction=gap_fraction)
    bulk = lam[lam <= out.bulk_edge]
    width = float(bulk.max() - bulk.min()) if bulk.size else 0.0
    return BulkOutliers(out.count, num_classes, out.bulk_edge, width, out.outlier_values, gap_fraction)
