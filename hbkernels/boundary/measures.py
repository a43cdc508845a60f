"""The paper's measures: alignment, the threshold eps, G, trace, lambda_max, norms, outliers.

Conventions (paper Eqs. 1, 2, 6; reference_setup.md sections 4-6):

* The Hessian is that of the mean training loss with the training labels.
* Per-sample gradients ``g(x)`` use the model's own prediction as the label ("reinforcing"
  gradients) unless said otherwise; the alignment ``A_i(x) = <g(x), v_i> / (|g(x)| |v_i|)`` is a
  signed cosine (a zero gradient gives 0).
* The threshold ``eps`` is the mean, over ``num_directions`` (5) random unit Gaussian directions
  ``r``, of ``max_s |cos(g(x_s), r)|`` over the training points (seeded; default seed 42).
* Round-off rule (:func:`roundoff_mask`): eps and G use only the training points with
  ``|g_s| > 100 * max(eps_mach(dtype), eps_mach(float32)) * max_t |g_t|``; a gradient below
  that carries no direction, and the float32 floor makes float32 and float64 copies of one
  model drop the same points (``Analysis.num_roundoff`` counts them).
* The exact spectrum is used whenever ``4 p^2`` floats fit the memory budget
  (:func:`exact_spectrum_fits`; default half the available memory), else the top-k Lanczos
  part, and ``G`` is then a lower bound, labelled "lower bound (top-k)".
* ``G`` counts the Hessian eigenvectors with a non-zero alignment with the training gradients,
  divided by ``p``. ``rule="max"`` (default) marks ``v_i`` when ``max_s |A_i(x_s)| >= eps`` (what
  the reference code and its Table 1 use); ``rule="mean"`` marks it when
  ``mean_s |A_i(x_s)| > eps`` (the paper's Eq. 6). Over the full exact spectrum ``G`` is exact;
  over a top-k part it is a lower bound (the count can only grow with more eigenvectors) and is
  labelled so.
* Outliers (stated rule, :func:`count_outliers`): scan the eigenvalues upward from the median;
  the bulk ends at the first gap between consecutive eigenvalues larger than
  ``gap_fraction * (lambda_max - lambda_min)`` (default 5 %); the eigenvalues above that gap are
  the outliers. This is the "isolated bars right of the bulk" of a linear-scale histogram.
* A collapsed Hessian (trace at round-off level, or every training gradient zero so that
  ``eps = 0``) makes ``G`` meaningless: :func:`analyze` then reports ``collapsed=True`` and
  ``G=None`` with the reason, instead of a number.

Every result object has ``to_dict()`` (JSON-serialisable) and ``save(path)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import hbkernels as hbk

from ..params import flatten_params, num_params
from ..results import Result, to_jsonable

__all__ = [
    "COHERENCE_MAX_POINTS",
    "ROUNDOFF_FACTOR",
    "Analysis",
    "BoundaryDistance",
    "CovarianceOverlap",
    "GMeasure",
    "GridAlignment",
    "JsonResult",
    "Outliers",
    "ReparamReport",
    "Spectrum",
    "Threshold",
    "alignment_map",
    "analyze",
    "as_dtype_model",
    "boundary_distance",
    "boundary_mask",
    "boundary_peak_report",
    "class_spectra",
    "compute_spectrum",
    "count_outliers",
    "covariance_overlaps",
    "exact_spectrum_bytes",
    "exact_spectrum_fits",
    "generalization_measure",
    "gradient_alignment",
    "grid_alignment",
    "loss_fn_for",
    "make_grid",
    "parameter_norm",
    "plane_alignment",
    "plane_grid",
    "predict",
    "random_direction_threshold",
    "random_directions",
    "reparameterization_report",
    "reparameterize",
    "roundoff_mask",
    "roundoff_tolerance",
    "threshold_from_alignments",
    "to_jsonable",
]

RULES = ("max", "mean")
_log = logging.getLogger("hbkernels")


# JSON: one convention for every result (hbkernels.results).
JsonResult = Result


# ----------------------------------------------------------------------------- small helpers
def loss_fn_for(loss: str | Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean training loss ``loss_fn(outputs, targets)`` for a name or a callable.

    Args:
        loss: ``"ce"``, ``"nll"``, ``"mse"`` (one-hot targets) or a callable returning the mean
            loss.
    """
    if callable(loss):
        return loss
    from ..losses import as_loss
    from .training import LOSSES, loss_function

    if loss not in LOSSES:
        return loss_function(loss)  # raises with the valid names
    # The registry's loss (not a closure): its mean reduction is known, so the operators need
    # no probe and the chain HVP uses the closed-form output Hessian.
    return as_loss("hbk.boundary", loss)


def _loss_name(loss: str | Callable) -> str:
    if isinstance(loss, str):
        if loss not in ("ce", "nll", "mse"):
            raise ValueError(f"hbk.boundary.measures: expected loss 'ce', 'nll' or 'mse', got {loss!r}")
        return loss
    return "ce"


def as_dtype_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself when it already has ``dtype`` (or dtype is None), else a converted copy."""
    if dtype is None:
        return model
    first = next(iter(model.parameters()), None)
    if first is not None and first.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    first = next(iter(model.parameters()), None)
    return torch.get_default_dtype() if first is None else first.dtype


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def parameter_norm(model: nn.Module) -> float:
    """Global L2 norm of all trainable parameters (``model_l2_norm`` of the reference)."""
    return float(flatten_params(model).double().norm())


def parameter_norm_sum(model: nn.Module) -> float:
    """The sum of the L2 norms of the parameter tensors, ``sum_l ||theta_l||``.

    The paper's Tables 1 and 2 report this as ``||theta||``: on the reference-scale runs it
    matches them to 1-2 % (gauss normal 19.35 vs 19.60, adversarial 105.1 vs 105.0), while the
    global L2 norm (:func:`parameter_norm`) is half of it.
    """
    with torch.no_grad():
        return float(sum(p.detach().double().norm() for p in model.parameters() if p.requires_grad))


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Predicted classes ``argmax f(x)`` for ``inputs`` ``(n, ...)``; returns ``(n,)`` int64."""
    dtype, device = _model_dtype(model), _model_device(model)
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        xb = inputs[i : i + batch_size].to(device=device, dtype=dtype)
        out.append(model(xb).argmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def gradient_alignment(
    model: nn.Module,
    inputs: torch.Tensor,
    vectors: torch.Tensor,
    *,
    labels: str | torch.Tensor = "pred",
    targets: torch.Tensor | None = None,
    loss: str = "ce",
    batch_size: int | None = None,
    normalize: bool = True,
    quiet: bool = True,
) -> torch.Tensor:
    """Cosine alignment of per-sample loss gradients with vectors (dtype/device handled).

    Casts inputs and vectors to the model's dtype and calls
    :func:`hbkernels.gradient_alignment` (which never forms the ``(n, p)`` gradient matrix and
    blocks the samples itself), optionally in input chunks of ``batch_size``. With
    ``normalize=False`` it returns the raw scalar product ``<g(x), v_j>`` instead (paper App.
    D), from the same pass: ``cos * |g(x)| * |v_j|``.

    Args:
        model: the classifier.
        inputs: ``(n, *input_shape)``; cast to the model's dtype.
        vectors: ``(p, k)`` in ``model.parameters()`` order (cast to the model's dtype).
        labels: ``"pred"`` (the model's prediction, the paper's Eq. 1), ``"true"`` (then
            ``targets`` is required) or an ``(n,)`` label tensor.
        targets: ``(n,)`` true labels for ``labels="true"``.
        loss: ``"ce"``, ``"nll"`` or ``"mse"``.
        batch_size: inputs per call (None: one call).
        normalize: True: the signed cosine (paper Eq. 2); False: the scalar product
            ``<g(x), v_j>``, not divided by either norm (App. D).
        quiet: no progress bar.

    Returns:
        ``(n, k)`` signed cosines (or scalar products); zero gradients give 0.
    """
    fn = "hbk.boundary.gradient_alignment"
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: expected normalize to be True or False, got {normalize!r}")
    p = num_params(model)
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != p:
        got = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"{fn}: expected vectors of shape ({p}, k), got {got}")
    dtype, device = _model_dtype(model), _model_device(model)
    vectors = vectors.to(device=device, dtype=dtype)
    n = inputs.shape[0]
    if isinstance(labels, torch.Tensor) and labels.shape[0] != n:
        raise ValueError(f"{fn}: expected labels of shape ({n},), got {tuple(labels.shape)}")
    if isinstance(labels, str) and labels == "true" and (targets is None or targets.shape[0] != n):
        got = None if targets is None else tuple(targets.shape)
        raise ValueError(f"{fn}: expected targets of shape ({n},) with labels='true', got {got}")
    step = n if batch_size is None else int(batch_size)
    out = []
    for i in range(0, n, max(step, 1)):
        xb = inputs[i : i + step].to(device=device, dtype=dtype)
        kw: dict[str, Any] = {"loss": loss, "quiet": quiet}
        if isinstance(labels, torch.Tensor):
            kw["labels"] = labels[i : i + step].to(device)
        else:
            kw["labels"] = labels
            if labels == "true":
                kw["targets"] = targets[i : i + step].to(device)
        if normalize:
            out.append(hbk.gradient_alignment(model, xb, vectors, **kw).detach().cpu())
        else:
            out.append(_scalar_products(model, xb, vectors, kw))
    if not out:
        return torch.zeros(0, vectors.shape[1], dtype=dtype)
    return torch.cat(out)


def _scalar_products(model: nn.Module, inputs: torch.Tensor, vectors: torch.Tensor,
                     kw: dict[str, Any]) -> torch.Tensor:
    """``<g_i, v_j> = cos_ij |g_i| |v_j|`` from one per-sample pass (norms and cosines), so the
    ``(n, p)`` gradient matrix is never formed; ``(n, k)`` on the CPU."""
    prod = hbk.per_sample_products(model, inputs, norms=True, vectors=vectors, **kw)
    cos = prod.alignment["vectors"].detach().double()
    scale = prod.norms.detach().double()[:, None] * vectors.double().norm(dim=0)[None, :]
    return (cos * scale).to(vectors.dtype).cpu()


# ----------------------------------------------------------------------------- grids
def make_grid(
    extent: Sequence[float], resolution: int | tuple[int, int] = 100, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A regular 2-D grid over ``extent = (xmin, xmax, ymin, ymax)``.

    Args:
        extent: the plot box.
        resolution: points per axis, or ``(nx, ny)``.
        dtype: dtype of the outputs.

    Returns:
        ``xs (nx,)``, ``ys (ny,)`` and ``points (ny * nx, 2)`` flattened row-major (x fastest),
        so ``values.reshape(ny, nx)`` puts ``y`` on rows.
    """
    if len(extent) != 4 or not (extent[0] < extent[1] and extent[2] < extent[3]):
        raise ValueError(f"hbk.boundary.make_grid: expected extent (xmin < xmax, ymin < ymax), got {extent}")
    nx, ny = (resolution, resolution) if isinstance(resolution, int) else resolution
    if nx < 2 or ny < 2:
        raise ValueError(f"hbk.boundary.make_grid: expected at least 2 points per axis, got {(nx, ny)}")
    xs = torch.linspace(extent[0], extent[1], nx, dtype=torch.float64)
    ys = torch.linspace(extent[2], extent[3], ny, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    return xs.to(dtype), ys.to(dtype), points.to(dtype)


def plane_grid(
    x0: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    resolution: int = 60,
    span: tuple[float, float] = (-0.5, 1.5),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points on the 2-D plane through three inputs: ``x0 + a (x1 - x0) + b (x2 - x0)``.

    Args:
        x0, x1, x2: inputs of any (equal) shape ``input_shape``.
        resolution: points per axis.
        span: range of ``a`` and ``b`` (``(0, 1)`` spans the three inputs).

    Returns:
        ``a (r,)``, ``b (r,)``, ``points (r * r, *input_shape)`` row-major (``a`` fastest).
    """
    if x0.shape != x1.shape or x0.shape != x2.shape:
        raise ValueError(
            "hbk.boundary.plane_grid: expected three inputs of equal shape, got "
            f"{tuple(x0.shape)}, {tuple(x1.shape)}, {tuple(x2.shape)}"
        )
    a = torch.linspace(span[0], span[1], resolution, dtype=torch.float64)
    bb, aa = torch.meshgrid(a, a, indexing="ij")
    x0d, d1, d2 = x0.double(), (x1 - x0).double(), (x2 - x0).double()
    pts = x0d + aa.reshape(-1, *([1] * x0.dim())) * d1 + bb.reshape(-1, *([1] * x0.dim())) * d2
    return a.to(x0.dtype), a.to(x0.dtype), pts.to(x0.dtype)


@dataclass
class GridAlignment(JsonResult):
    """Alignment maps of a 2-D grid (or plane) with k vectors.

    Attributes:
        xs: ``(nx,)`` first-axis coordinates.
        ys: ``(ny,)`` second-axis coordinates.
        pred: ``(ny, nx)`` predicted class at each grid point.
        maps: ``(k, ny, nx)`` signed cosine alignment with each vector (the scalar products
            ``<g(x), v_i>`` when ``normalized`` is False, paper App. D).
        normalized: True for cosines, False for scalar products.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    pred: torch.Tensor
    maps: torch.Tensor
    normalized: bool = True

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (float(self.xs[0]), float(self.xs[-1]), float(self.ys[0]), float(self.ys[-1]))

    def to_dict(self) -> dict:
        return {"xs": self.xs, "ys": self.ys, "pred": self.pred, "maps": self.maps,
                "normalized": self.normalized}


def grid_alignment(
    model: nn.Module,
    vectors: torch.Tensor,
    extent: Sequence[float],
    resolution: int = 100,
    *,
    loss: str = "ce",
    normalize: bool = True,
    quiet: bool = True,
) -> GridAlignment:
    """Predicted classes and alignment maps of a 2-D input grid with ``vectors``.

    Args:
        model: a classifier on 2-D inputs.
        vectors: ``(p, k)`` (e.g. the top-k Hessian eigenvectors).
        extent: ``(xmin, xmax, ymin, ymax)``.
        resolution: points per axis (the reference uses 100).
        loss: per-sample loss of the gradients (predicted labels).
        normalize: cosines (True) or scalar products ``<g(x), v_i>`` (False, App. D).
        quiet: no progress bar.

    Returns:
        :class:`GridAlignment` with maps ``(k, resolution, resolution)``.
    """
    xs, ys, pts = make_grid(extent, resolution, dtype=_model_dtype(model))
    pred = predict(model, pts).reshape(len(ys), len(xs))
    a = gradient_alignment(model, pts, vectors, labels="pred", loss=loss, normalize=normalize,
                           quiet=quiet)
    maps = a.T.reshape(-1, len(ys), len(xs))
    return GridAlignment(xs=xs, ys=ys, pred=pred, maps=maps, normalized=normalize)


def plane_alignment(
    model: nn.Module,
    anchors: Sequence[torch.Tensor],
    vectors: torch.Tensor,
    resolution: int = 60,
    span: tuple[float, float] = (-0.5, 1.5),
    *,
    loss: str = "ce",
    normalize: bool = True,
    quiet: bool = True,
) -> GridAlignment:
    """Alignment maps on the 2-D plane through three inputs (for high-dimensional data).

    The plane is ``x0 + a (x1 - x0) + b (x2 - x0)``; the anchors sit at ``(a, b) = (0, 0)``,
    ``(1, 0)`` and ``(0, 1)``.

    Args:
        model: the classifier.
        anchors: the three inputs ``x0, x1, x2`` (each ``input_shape``).
        vectors: ``(p, k)``.
        resolution: points per axis.
        span: range of ``a`` and ``b``.
        loss: per-sample loss of the gradients (predicted labels).
        normalize: cosines (True) or scalar products (False, App. D).
        quiet: no progress bar.

    Returns:
        :class:`GridAlignment` with ``xs = a``, ``ys = b``.
    """
    if len(anchors) != 3:
        raise ValueError(f"hbk.boundary.plane_alignment: expected three anchors, got {len(anchors)}")
    x0, x1, x2 = (a.to(_model_dtype(model)) for a in anchors)
    a, b, pts = plane_grid(x0, x1, x2, resolution, span)
    pred = predict(model, pts).reshape(len(b), len(a))
    al = gradient_alignment(model, pts, vectors, labels="pred", loss=loss, normalize=normalize,
                            quiet=quiet)
    return GridAlignment(xs=a, ys=b, pred=pred, maps=al.T.reshape(-1, len(b), len(a)),
                         normalized=normalize)


def alignment_map(
    model: nn.Module,
    plane_or_grid: Any,
    vectors: torch.Tensor,
    *,
    resolution: int = 100,
    loss: str | Callable = "ce",
    normalize: bool = True,
    quiet: bool = True,
) -> GridAlignment:
    """Predicted classes and alignment maps ``A_i(x)`` over a 2-D grid or a plane of inputs.

    Args:
        model: any classifier (``nn.Module``) with ``(n, C)`` outputs.
        plane_or_grid: one of

            * an extent ``(xmin, xmax, ymin, ymax)`` (2-D inputs): a ``resolution``-square grid;
            * three inputs ``[x0, x1, x2]`` (any input shape): the plane
              ``x0 + a (x1 - x0) + b (x2 - x0)``, ``a, b`` in ``[-0.5, 1.5]``;
            * ``(xs (nx,), ys (ny,), points (ny * nx, ...))`` as returned by :func:`make_grid`
              or :func:`plane_grid` (row-major, ``xs`` fastest).
        vectors: ``(p, k)`` (or ``(p,)``) in ``model.parameters()`` order, any float dtype
            (cast to the model's).
        resolution: points per axis for an extent or a plane.
        loss: per-sample loss of the gradients (predicted labels).
        normalize: True: the cosines ``A_i(x)``; False: the scalar products
            ``<g(x), v_i>`` (paper App. D: large gradients on the boundary dominate them).
        quiet: no progress bar.

    Returns:
        :class:`GridAlignment` with ``maps (k, ny, nx)``.
    """
    fn = "hbk.boundary.alignment_map"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if isinstance(vectors, torch.Tensor) and vectors.dim() == 1:
        vectors = vectors[:, None]
    g = plane_or_grid
    if isinstance(g, (tuple, list)) and len(g) == 4 and all(
            isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
            for v in g):
        return grid_alignment(model, vectors, [float(v) for v in g], resolution, loss=loss,
                              normalize=normalize, quiet=quiet)
    if isinstance(g, (tuple, list)) and len(g) == 3 and all(isinstance(v, torch.Tensor) for v in g):
        if g[0].dim() == 1 and g[1].dim() == 1 and g[2].dim() >= 2 and \
                g[2].shape[0] == g[0].numel() * g[1].numel():
            xs, ys, pts = g
            pts = pts.to(_model_dtype(model))
            pred = predict(model, pts).reshape(len(ys), len(xs))
            al = gradient_alignment(model, pts, vectors, labels="pred", loss=loss,
                                    normalize=normalize, quiet=quiet)
            return GridAlignment(xs=xs, ys=ys, pred=pred, maps=al.T.reshape(-1, len(ys), len(xs)),
                                 normalized=normalize)
        return plane_alignment(model, list(g), vectors, resolution=resolution, loss=loss,
                               normalize=normalize, quiet=quiet)
    raise TypeError(f"{fn}: expected an extent (xmin, xmax, ymin, ymax), three anchor inputs or "
                    f"a grid (xs, ys, points), got {type(g).__name__}"
                    f"{' of length ' + str(len(g)) if isinstance(g, (tuple, list)) else ''}")


def boundary_mask(pred: torch.Tensor | np.ndarray) -> np.ndarray:
    """Decision-boundary pixels of a predicted-class image (the reference's Sobel rule).

    Sobel-filter the class image along each axis and keep the pixels where either
    ``|sobel| >= max|sobel| / 5``.

    Args:
        pred: ``(ny, nx)`` predicted classes.

    Returns:
        ``(ny, nx)`` bool mask (all False for a constant image).
    """
    from scipy import ndimage

    img = np.asarray(pred, dtype=np.float64)
    sx = np.abs(ndimage.sobel(img, axis=-1))
    sy = np.abs(ndimage.sobel(img, axis=0))
    mask = np.zeros(img.shape, dtype=bool)
    for s in (sx, sy):
        if s.max() > 0:
            mask |= s >= s.max() / 5
    return mask


@dataclass
class BoundaryDistance(JsonResult):
    """Distances of points to the model's decision boundary, measured on a fine 2-D grid.

    Attributes:
        margin: the smallest distance (the geometric margin of the training set).
        index: the point attaining it.
        distances: ``(n,)`` distance of every point to the nearest class change.
        resolution: grid points per axis (the error is at most about half a grid step).
    """

    margin: float
    index: int
    distances: torch.Tensor
    resolution: int

    def to_dict(self) -> dict:
        return {"margin": self.margin, "index": self.index, "resolution": self.resolution,
                "median_distance": float(self.distances.median())}


def boundary_distance(
    model: nn.Module, points: torch.Tensor, extent: Sequence[float], resolution: int = 400
) -> BoundaryDistance:
    """Ground-truth margin of 2-D data: distance from each point to the decision boundary.

    The boundary is located on a ``resolution`` x ``resolution`` grid of predicted classes as
    the midpoints between horizontally or vertically adjacent cells of different classes (the
    reference margin figure uses a 400 x 400 grid); each point's distance is the distance to
    the nearest such midpoint.

    Args:
        model: a classifier on 2-D inputs.
        points: ``(n, 2)`` (e.g. the training inputs).
        extent: ``(xmin, xmax, ymin, ymax)`` covering the points.
        resolution: grid points per axis.

    Returns:
        :class:`BoundaryDistance` (``margin = inf`` if the grid holds a single class).
    """
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"hbk.boundary.boundary_distance: expected (n, 2) points, got {tuple(points.shape)}")
    xs, ys, pts = make_grid(extent, resolution, dtype=_model_dtype(model))
    pred = predict(model, pts).reshape(len(ys), len(xs))
    xs, ys = xs.double(), ys.double()
    mids = []
    h = (pred[:, 1:] != pred[:, :-1]).nonzero()
    if h.numel():
        mids.append(torch.stack([(xs[h[:, 1]] + xs[h[:, 1] + 1]) / 2, ys[h[:, 0]]], 1))
    v = (pred[1:, :] != pred[:-1, :]).nonzero()
    if v.numel():
        mids.append(torch.stack([xs[v[:, 1]], (ys[v[:, 0]] + ys[v[:, 0] + 1]) / 2], 1))
    P = points.double().cpu()
    if not mids:
        d = torch.full((P.shape[0],), float("inf"), dtype=torch.float64)
    else:
        d = torch.cdist(P, torch.cat(mids)).amin(dim=1)
    i = int(torch.argmin(d))
    return BoundaryDistance(float(d[i]), i, d, resolution)


def boundary_peak_report(grid: GridAlignment) -> dict:
    """How strongly each alignment map peaks on the decision boundary.

    For each map ``i``: the mean ``|A_i|`` on boundary pixels and elsewhere (their ratio > 1
    means the map is concentrated on the boundary), the fraction of the top-1 % ``|A_i|``
    pixels that lie within two pixels of the boundary, and the distance (input units) from the
    ``argmax |A_i|`` pixel to the nearest boundary pixel.

    Returns:
        ``{"per_vector": [...], "boundary_fraction": float}`` (JSON-serialisable).
    """
    from scipy import ndimage

    mask = boundary_mask(grid.pred)
    xs, ys = grid.xs.double().numpy(), grid.ys.double().numpy()
    near = ndimage.binary_dilation(mask, iterations=2) if mask.any() else mask
    out = []
    if mask.any():
        by, bx = np.nonzero(mask)
        bpts = np.stack([xs[bx], ys[by]], axis=1)
    for i, m in enumerate(grid.maps.abs().double().numpy()):
        rec: dict[str, Any] = {"index": i + 1, "max_abs": float(m.max())}
        if mask.any() and (~mask).any():
            on, off = float(m[mask].mean()), float(m[~mask].mean())
            rec.update(mean_abs_on_boundary=on, mean_abs_off_boundary=off,
                       ratio=on / off if off > 0 else None)
            q = np.quantile(m, 0.99)
            top = m >= q
            rec["top1pct_near_boundary"] = float((top & near).sum() / max(top.sum(), 1))
            iy, ix = np.unravel_index(int(np.argmax(m)), m.shape)
            rec["argmax_distance"] = float(np.min(np.hypot(bpts[:, 0] - xs[ix], bpts[:, 1] - ys[iy])))
        out.append(rec)
    return {"per_vector": out, "boundary_fraction": float(mask.mean())}


# ----------------------------------------------------------------------------- threshold, G
def random_directions(
    p: int, num: int = 5, seed: int = 42, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``num`` random unit Gaussian directions in parameter space, seeded.

    Returns:
        ``(p, num)`` with unit-norm columns (drawn in float64, then cast).
    """
    if p < 1 or num < 1:
        raise ValueError(f"hbk.boundary.random_directions: expected p >= 1 and num >= 1, got {p}, {num}")
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(p, num, generator=gen, dtype=torch.float64)
    return (r / r.norm(dim=0, keepdim=True)).to(dtype)


#: ``c`` of the round-off rule (:func:`roundoff_mask`).
ROUNDOFF_FACTOR = 100.0


def roundoff_tolerance(norms: torch.Tensor, dtype: torch.dtype | None = None, *,
                       factor: float = ROUNDOFF_FACTOR) -> float:
    """The gradient norm at or below which a point's gradient is round-off (see
    :func:`roundoff_mask`): ``factor * max(eps(dtype), eps(float32)) * max_s |g_s|``."""
    fn = "hbk.boundary.roundoff_tolerance"
    if not isinstance(norms, torch.Tensor) or norms.dim() != 1:
        raise TypeError(f"{fn}: expected a (n,) tensor of gradient norms, got "
                        f"{tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__}")
    if not (math.isfinite(float(factor)) and factor >= 0):
        raise ValueError(f"{fn}: expected a finite factor >= 0, got {factor}")
    dtype = norms.dtype if dtype is None else dtype
    mach = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    scale = float(norms.double().abs().max()) if norms.numel() else 0.0
    return float(factor) * mach * scale


def roundoff_mask(norms: torch.Tensor, dtype: torch.dtype | None = None, *,
                  factor: float = ROUNDOFF_FACTOR) -> torch.Tensor:
    """Points whose per-sample gradient is above round-off level (the ones eps and G use).

    Rule: point ``s`` is kept when ``|g_s| > c * eps_mach * max_t |g_t|`` with
    ``c = factor`` (100) and ``eps_mach = max(eps(dtype), eps(float32))``. A gradient within a
    few hundred ulps of the largest one's scale carries no direction (its cosines with any
    vector are noise: in float64 a saturated softmax leaves gradients ~1e-16 pointing anywhere,
    in float32 the same points give exact zeros). The float32 floor is used in float64 too, so
    a float32 and a float64 copy of one model drop the same points and give the same eps and G.

    Args:
        norms: ``(n,)`` gradient norms ``|g_s|``.
        dtype: the analysis dtype (default ``norms.dtype``).
        factor: ``c`` (0 keeps every non-zero gradient).

    Returns:
        ``(n,)`` bool, True for the points kept.
    """
    tol = roundoff_tolerance(norms, dtype, factor=factor)
    return norms.double().abs() > tol


def threshold_from_alignments(alignments: torch.Tensor, keep: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """``eps`` parts from the ``(n, r)`` alignments with ``r`` random directions.

    Args:
        alignments: ``(n, r)``.
        keep: ``(n,)`` bool, the points above round-off (:func:`roundoff_mask`); None: all.

    Returns:
        ``(r,)``: ``max_s |A_r(x_s)|`` per direction over the kept points; ``eps`` is their
        mean (0 when no point is kept).
    """
    if alignments.dim() != 2 or alignments.shape[0] == 0 or alignments.shape[1] == 0:
        raise ValueError(
            "hbk.boundary.threshold_from_alignments: expected a non-empty (n, r) matrix, "
            f"got shape {tuple(alignments.shape)}"
        )
    if keep is not None:
        alignments = alignments[_check_keep("hbk.boundary.threshold_from_alignments", keep,
                                            alignments.shape[0])]
        if alignments.shape[0] == 0:
            return torch.zeros(alignments.shape[1], dtype=alignments.dtype)
    return alignments.abs().amax(dim=0)


def _check_keep(fn: str, keep: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (n,):
        got = (f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor)
               else type(keep).__name__)
        raise TypeError(f"{fn}: expected keep to be a ({n},) bool tensor, got {got}")
    return keep.cpu()


@dataclass
class Threshold(JsonResult):
    """The random-direction threshold ``eps`` (mean of ``per_direction``)."""

    eps: float
    per_direction: list[float]
    num_directions: int
    seed: int
    num_ignored: int = 0
    roundoff_tol: float | None = None

    @property
    def min(self) -> float:
        return min(self.per_direction)

    def to_dict(self) -> dict:
        return {"eps": self.eps, "eps_min": self.min, "per_direction": self.per_direction,
                "num_directions": self.num_directions, "seed": self.seed,
                "num_ignored_roundoff": self.num_ignored, "roundoff_tol": self.roundoff_tol}


def random_direction_threshold(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    num_directions: int = 5,
    seed: int = 42,
    labels: str | torch.Tensor = "pred",
    targets: torch.Tensor | None = None,
    loss: str = "ce",
    roundoff_factor: float | None = ROUNDOFF_FACTOR,
) -> Threshold:
    """``eps = mean_r max_s |cos(g(x_s), r)|`` over seeded random unit Gaussian directions.

    The max runs over the points whose gradient is above round-off (:func:`roundoff_mask`).

    Args:
        model: the classifier.
        inputs: ``(n, ...)`` training inputs.
        num_directions: number of random directions (reference: 5).
        seed: seed of the directions (reference: 42, with numpy's RandomState; here torch's
            generator, so the directions differ from the reference's but have the same law).
        labels, targets, loss: as in :func:`gradient_alignment`.
        roundoff_factor: ``c`` of the round-off rule; None uses every point.

    Returns:
        :class:`Threshold`.
    """
    r = random_directions(num_params(model), num_directions, seed, dtype=_model_dtype(model))
    keep = tol = None
    if roundoff_factor is None:
        a = gradient_alignment(model, inputs, r, labels=labels, targets=targets, loss=loss)
    else:  # alignments and norms from one per-sample pass
        dtype, device = _model_dtype(model), _model_device(model)
        kw: dict[str, Any] = {"loss": loss}
        kw["labels"] = labels.to(device) if isinstance(labels, torch.Tensor) else labels
        if isinstance(labels, str) and labels == "true":
            kw["targets"] = None if targets is None else targets.to(device)
        prod = hbk.per_sample_products(model, inputs.to(device=device, dtype=dtype), norms=True,
                                       vectors=r.to(device), **kw)
        a = prod.alignment["vectors"].detach().cpu()
        norms = prod.norms.detach().cpu()
        tol = roundoff_tolerance(norms, dtype, factor=roundoff_factor)
        keep = norms.double() > tol
    return _threshold(a, num_directions, seed, keep=keep, tol=tol)


def _threshold(a: torch.Tensor, num_directions: int, seed: int,
               keep: torch.Tensor | None = None, tol: float | None = None) -> Threshold:
    per = threshold_from_alignments(a, keep).double()
    ignored = 0 if keep is None else int((~keep).sum())
    return Threshold(eps=float(per.mean()), per_direction=[float(v) for v in per],
                     num_directions=num_directions, seed=seed, num_ignored=ignored,
                     roundoff_tol=tol)


@dataclass
class GMeasure(JsonResult):
    """The generalization measure ``G = count / total``.

    Attributes:
        value: ``count / total``.
        count: eigenvectors marked as aligned.
        total: ``p`` (the denominator).
        num_vectors: eigenvectors examined (``k <= p``).
        rule: ``"max"`` or ``"mean"``.
        eps: threshold used.
        lower_bound: True when only the top ``k < p`` eigenvectors were examined.
    """

    value: float
    count: int
    total: int
    num_vectors: int
    rule: str
    eps: float
    lower_bound: bool

    def to_dict(self) -> dict:
        return {"G": self.value, "count": self.count, "total": self.total,
                "num_vectors": self.num_vectors, "rule": self.rule, "eps": self.eps,
                "lower_bound": self.lower_bound}


def generalization_measure(
    alignments: torch.Tensor, eps: float, *, rule: str = "max", num_params: int | None = None,
    keep: torch.Tensor | None = None,
) -> GMeasure:
    """``G`` from the ``(n, k)`` alignments of the training gradients with ``k`` eigenvectors.

    ``rule="max"``: ``#{i : max_s |A_i(x_s)| >= eps} / p`` (reference code, Table 1).
    ``rule="mean"``: ``#{i : mean_s |A_i(x_s)| > eps} / p`` (paper Eq. 6).

    Args:
        alignments: ``(n, k)``.
        eps: the threshold (:func:`random_direction_threshold`).
        rule: ``"max"`` or ``"mean"``.
        num_params: ``p``; default ``k`` (full spectrum). With ``k < p`` the value is a lower
            bound and is labelled so.
        keep: ``(n,)`` bool, the points above round-off (:func:`roundoff_mask`); the max and
            the mean run over these only. None: every point.

    Returns:
        :class:`GMeasure`.
    """
    fn = "hbk.boundary.generalization_measure"
    if rule not in RULES:
        raise ValueError(f"{fn}: expected rule 'max' or 'mean', got {rule!r}")
    if alignments.dim() != 2 or alignments.shape[0] == 0:
        raise ValueError(f"{fn}: expected a non-empty (n, k) matrix, got shape {tuple(alignments.shape)}")
    if not math.isfinite(float(eps)) or eps < 0:
        raise ValueError(f"{fn}: expected a finite eps >= 0, got {eps}")
    k = alignments.shape[1]
    total = k if num_params is None else int(num_params)
    if total < k:
        raise ValueError(f"{fn}: expected num_params >= k = {k}, got {total}")
    bad = int((~torch.isfinite(alignments)).sum())
    if bad:  # a NaN compares False with eps: it would silently count as "not aligned"
        raise ValueError(f"{fn}: expected finite alignments, got {bad} NaN/inf entries of "
                         f"{alignments.numel()} (shape {tuple(alignments.shape)})")
    a = alignments.abs().double()
    if keep is not None:
        a = a[_check_keep(fn, keep, a.shape[0])]
        if a.shape[0] == 0:
            raise ValueError(f"{fn}: expected at least one gradient above round-off, got none of "
                             f"{alignments.shape[0]}")
    if rule == "max":
        count = int((a.amax(dim=0) >= eps).sum())
    else:
        count = int((a.mean(dim=0) > eps).sum())
    return GMeasure(value=count / total, count=count, total=total, num_vectors=k, rule=rule,
                    eps=float(eps), lower_bound=k < total)


# ----------------------------------------------------------------------------- outliers
@dataclass
class Outliers(JsonResult):
    """Spectrum outliers by the gap rule (see the module docstring)."""

    count: int
    bulk_edge: float
    gap_threshold: float
    gap_fraction: float
    outlier_values: list[float]

    def to_dict(self) -> dict:
        return {"count": self.count, "bulk_edge": self.bulk_edge,
                "gap_threshold": self.gap_threshold, "gap_fraction": self.gap_fraction,
                "outlier_values": self.outlier_values, "rule": "first gap above the median "
                "larger than gap_fraction * (lambda_max - lambda_min)"}


def count_outliers(eigenvalues: torch.Tensor | np.ndarray, *, gap_fraction: float = 0.05) -> Outliers:
    """Number of spectrum outliers: eigenvalues above the first large gap above the bulk.

    Rule: sort ascending; starting at the median eigenvalue, scan upward; the bulk ends at the
    first eigenvalue whose distance to the next one exceeds
    ``gap_fraction * (lambda_max - lambda_min)``. All eigenvalues above that gap are outliers.
    With a top-k part of the spectrum (a Lanczos result), the missing bulk sits below the
    smallest computed value; the scan then starts at the smallest computed eigenvalue.

    Args:
        eigenvalues: ``(m,)`` in any order.
        gap_fraction: gap relative to the spectral range (default 0.05: 1/20 of the range,
            i.e. an empty stretch of 10 bins in the reference's 200-bin histograms).

    Returns:
        :class:`Outliers`.
    """
    if not 0 < gap_fraction < 1:
        raise ValueError(f"hbk.boundary.count_outliers: expected 0 < gap_fraction < 1, got {gap_fraction}")
    ev = np.sort(np.asarray(torch.as_tensor(eigenvalues).double().cpu(), dtype=np.float64))
    if ev.size == 0 or not np.all(np.isfinite(ev)):
        raise ValueError("hbk.boundary.count_outliers: expected non-empty finite eigenvalues")
    span = float(ev[-1] - ev[0])
    thr = gap_fraction * span
    if span <= 0:
        return Outliers(0, float(ev[-1]), thr, gap_fraction, [])
    start = (ev.size - 1) // 2
    gaps = np.diff(ev[start:])
    big = np.nonzero(gaps > thr)[0]
    if big.size == 0:
        return Outliers(0, float(ev[-1]), thr, gap_fraction, [])
    edge = start + int(big[0])
    outl = ev[edge + 1 :][::-1]
    return Outliers(int(outl.size), float(ev[edge]), thr, gap_fraction, [float(v) for v in outl])


# ----------------------------------------------------------------------------- spectra
@dataclass
class Spectrum(JsonResult):
    """Hessian eigenpairs of a training loss.

    Attributes:
        eigenvalues: ``(m,)`` descending (float64); ``m = p`` when exact.
        eigenvectors: ``(p, m)`` columns in ``model.parameters()`` order, or None.
        num_params: ``p``.
        exact: True for the full dense spectrum.
        method: ``"exact"``, ``"exact-range"`` (through the range of a low-rank Hessian,
            :mod:`hbkernels.rangespace`) or ``"lanczos"``.
        seconds: wall time.
        trace: ``sum(eigenvalues)`` when exact, else a Hutch++ estimate.
        rank: ``"exact-range"``: the rank ``r`` (the other ``p - r`` eigenvalues are 0).
        null_alignment_max: ``"exact-range"``: the largest ``|cos|`` of a training gradient
            with any vector of the null space (G is exact when it is below eps).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    num_params: int
    exact: bool
    method: str
    seconds: float
    trace: float | None = None
    converged: list[bool] | None = None
    rank: int | None = None
    null_alignment_max: float | None = None

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def top(self, k: int) -> torch.Tensor:
        """The top-``k`` eigenvectors ``(p, k)``."""
        if self.eigenvectors is None:
            raise ValueError("hbk.boundary.Spectrum.top: expected stored eigenvectors, got None")
        return self.eigenvectors[:, : min(k, self.eigenvectors.shape[1])]

    def to_dict(self) -> dict:
        return {"num_params": self.num_params, "exact": self.exact, "method": self.method,
                "seconds": self.seconds, "trace": self.trace, "lambda_max": self.lambda_max,
                "num_eigenvalues": int(self.eigenvalues.numel()),
                "top_eigenvalues": self.eigenvalues[:25], "converged": self.converged,
                "rank": self.rank, "null_alignment_max": self.null_alignment_max}


def _data_as(data: tuple[torch.Tensor, torch.Tensor], model: nn.Module):
    X, y = data
    return X.to(device=_model_device(model), dtype=_model_dtype(model)), y.to(_model_device(model))


def exact_spectrum_bytes(p: int, dtype: torch.dtype = torch.float64) -> int:
    """Memory of an exact spectrum: the ``p x p`` Hessian, its ``p x p`` eigenvectors and the
    ``eigh`` (divide and conquer) workspace of about ``2 p^2 + 6 p`` elements: ``(4 p^2 + 6 p)``
    elements of ``dtype``."""
    return int((4 * p * p + 6 * p) * (torch.finfo(dtype).bits // 8))


def exact_spectrum_fits(p: int, dtype: torch.dtype = torch.float64,
                        memory_budget: int | None = None, device: torch.device | str = "cpu"
                        ) -> bool:
    """Whether the exact spectrum of a ``p``-parameter model fits the memory budget.

    Args:
        p: parameters.
        dtype: dtype of the Hessian.
        memory_budget: bytes allowed (default: half of the memory available now, ``MemAvailable``
            of ``/proc/meminfo`` or the free GPU memory).
        device: where the Hessian would live.

    Returns:
        ``exact_spectrum_bytes(p, dtype) <= memory_budget``.
    """
    from ..hessian import _available_bytes

    if memory_budget is None:
        memory_budget = _available_bytes(torch.device(device)) // 2
    if not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError("hbk.boundary.exact_spectrum_fits: expected memory_budget to be an "
                         f"integer number of bytes >= 0, got {memory_budget!r}")
    return exact_spectrum_bytes(p, dtype) <= memory_budget


def compute_spectrum(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    loss: str | Callable = "ce",
    k: int | None = None,
    max_exact_params: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    tol: float = 1e-8,
    trace_samples: int = 99,
    seed: int = 0,
    memory_budget: int | None = None,
    quiet: bool = True,
) -> Spectrum:
    """Hessian spectrum of the mean training loss: exact whenever it fits the memory budget.

    The exact (dense) path is taken when :func:`exact_spectrum_fits` (``4 p^2`` elements
    within ``memory_budget``) and, if given, ``p <= max_exact_params``; otherwise the top-``k``
    Lanczos part (and a lower-bound ``G`` downstream).

    Args:
        model: the classifier (converted to ``dtype`` in a copy).
        data: ``(X, y)`` training inputs and labels.
        loss: loss name or callable ``loss_fn(outputs, targets)`` (mean).
        k: eigenpairs for the Lanczos path (default ``min(p, 100)``); the exact path keeps all.
        max_exact_params: an extra cap on ``p`` for the dense path (None: memory only).
        dtype: dtype of the Hessian (float64 by default; None keeps the model's).
        tol: Lanczos tolerance.
        trace_samples: operator products of the Hutch++ trace estimate on the Lanczos path.
        seed: seed of the Lanczos start and of the trace estimate.
        memory_budget: bytes for the dense path (default: half of the available memory).
        quiet: no progress bar while the Hessian is assembled.

    Returns:
        :class:`Spectrum` (eigenvalues descending).
    """
    m = as_dtype_model(model, dtype)
    loss_fn = loss_fn_for(loss)
    X, y = _data_as(data, m)
    p = num_params(m)
    t0 = time.perf_counter()
    use_exact = (max_exact_params is None or p <= max_exact_params) and exact_spectrum_fits(
        p, _model_dtype(m), memory_budget, _model_device(m))
    if use_exact:
        kw: dict[str, Any] = {"quiet": quiet}
        if memory_budget is not None:
            kw["memory_budget"] = int(memory_budget)
        evals, evecs = hbk.hessian_spectrum(m, loss_fn, (X, y), dtype=_model_dtype(m), **kw)
        evals = evals.double()
        if not torch.isfinite(evals).all():
            raise ValueError("hbk.boundary.compute_spectrum: expected finite eigenvalues, got NaN/inf")
        return Spectrum(evals, evecs, p, True, "exact", time.perf_counter() - t0,
                        trace=float(evals.sum()))
    kk = min(p, k or 100)
    res = hbk.hessian_eigs(m, loss_fn, (X, y), kk, which="LA", tol=tol, seed=seed, quiet=quiet)
    op = hbk.HessianOperator(m, loss_fn, (X, y))
    trace = float(hbk.hessian_trace(op, num_probes=trace_samples, seed=seed).estimate)
    return Spectrum(res.eigenvalues.double(), res.eigenvectors, p, False, "lanczos",
                    time.perf_counter() - t0, trace=trace,
                    converged=[bool(c) for c in torch.as_tensor(res.converged).reshape(-1)])


def _tridiagonal_spectrum(m: nn.Module, loss: str | Callable, data: tuple[torch.Tensor, torch.Tensor],
                          loss_name: str | Callable, *, keep: int, max_exact_params: int | None,
                          memory_budget: int | None, quiet: bool, route: str = "auto"):
    """The exact path of :func:`analyze` without the ``p x p`` eigenvectors (issue 11 item 4).

    ``route="auto"`` first tries the range of the Hessian from block products
    (:func:`hbkernels.rangespace.range_spectrum`, rank <= p / 3; tried only for the closed-form
    MLP chain with ``n C <= p / 4``: the reference MLPs have rank 700-1,300 of 10,703), then
    tridiagonalisation;
    ``"tridiag"`` goes straight to tridiagonalisation. Returns ``(spectrum, alignments,
    null_alignment)`` with ``null_alignment`` ``(n,)`` on the range route (else None).

    All eigenvalues, the top-``keep`` eigenvectors and the ``(n, p)`` training alignments with
    every eigenvector from :func:`hbkernels.tridiag.alignment_spectrum` (sytrd + ormtr on the
    per-sample gradients + stemr + GEMM; same values as eigh + products). None where the dense
    path does not apply (budget, cap, a non-CPU model) or ``n > p`` (the ``(n, p)`` gradient
    matrix would outweigh the saving); the caller then takes the eigh route.
    """
    from ..tridiag import alignment_spectrum

    X, y = data
    p, n = num_params(m), X.shape[0]
    dt, dev = _model_dtype(m), _model_device(m)
    if (dev.type != "cpu" or n > p or (max_exact_params is not None and p > max_exact_params)
            or not exact_spectrum_fits(p, dt, memory_budget, dev)):
        return None
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"quiet": quiet}
    if memory_budget is not None:
        kw["memory_budget"] = int(memory_budget)
    G = hbk.per_sample_grads(m, X, labels="pred", loss=loss_name)
    C = int(y.max()) + 1 if y.numel() and not y.is_floating_point() else 1
    # The range route pays where block products are cheap and the rank small: the closed-form
    # MLP chain (measured: reference Table 1 nets, rank 700-1,300 of 10,703, 4-6x faster than
    # tridiagonalisation), with the Gauss-Newton rank n (C - 1) well below p. On the digits
    # CNNs a 256-column conv block product costs more than the split assembly of all of H.
    op = (hbk.HessianOperator(m, loss_fn_for(loss), (X, y))
          if route == "auto" and n * C <= p // 4 else None)
    if op is not None and op.method == "linear_chain":
        from ..rangespace import range_spectrum

        low = range_spectrum(op, G, top_vectors=min(keep, p), block=256)
        if low is not None:  # analyze checks null_alignment against eps
            del G
            spec = Spectrum(low.eigenvalues, low.vectors.to(dt), p, True, "exact-range",
                            time.perf_counter() - t0, trace=float(low.eigenvalues.sum()),
                            rank=low.rank, null_alignment_max=low.null_alignment_max)
            return spec, low.alignments, low.null_alignment
    H = hbk.exact_hessian(m, loss_fn_for(loss), (X, y), dtype=dt, **kw)
    res = alignment_spectrum(H, G, return_alignments=True, top_vectors=min(keep, p), overwrite=True)
    del H, G
    if not torch.isfinite(res.eigenvalues).all():
        raise ValueError("hbk.boundary.compute_spectrum: expected finite eigenvalues, got NaN/inf")
    spec = Spectrum(res.eigenvalues, res.vectors.to(dt), p, True, "exact",
                    time.perf_counter() - t0, trace=float(res.eigenvalues.sum()))
    return spec, res.alignments, None


# ----------------------------------------------------------------------------- full analysis
@dataclass
class Analysis(JsonResult):
    """Every measure of one model at one minimum; ``save(path)`` / ``Analysis.load(path)``.

    ``G`` is the value under ``rule`` (None when the Hessian collapsed); ``G_max`` and
    ``G_mean`` are both rules; ``G_lower_bound`` is True when only a top-k part of the spectrum
    was examined (``G_label`` says "exact" or "lower bound (top-k)"). eps and G use only the
    training points whose gradient is above round-off (:func:`roundoff_mask`;
    ``num_roundoff`` of them were left out). ``spectral_type`` and ``bulk_outliers`` are the
    readings of :mod:`hbkernels.boundary.spectra`. ``alignments`` (``(n, k_keep)`` training
    alignments with the top eigenvectors), ``spectrum`` (all eigenvalues, the top ``keep``
    eigenvectors; :func:`compute_spectrum` gives all of them), ``labels``
    and the optional ``per_class`` spectra and ``margin`` go into the tensor file on ``save``;
    ``to_dict`` holds the scalars only (``per_class``: lambda_max, trace and top eigenvalues per
    class). ``coherence`` is the class-block gradient coherence
    (:class:`~hbkernels.boundary.appendix.GradientCoherence`, block means only) or None.
    """

    num_params: int
    exact: bool
    G: float | None
    G_rule: str
    G_max: GMeasure | None
    G_mean: GMeasure | None
    G_lower_bound: bool
    eps: Threshold
    trace: float | None
    lambda_max: float
    param_norm: float
    outliers: Outliers
    collapsed: bool
    collapse_reason: str | None
    zero_grad_fraction: float
    seconds: dict
    spectrum: Spectrum = field(repr=False)
    alignments: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    spectral_type: Any = None
    bulk_outliers: Any = None
    num_roundoff: int = 0
    num_classes: int | None = None
    per_class: dict | None = field(default=None, repr=False)
    margin: Any = field(default=None, repr=False)
    names: dict = field(default_factory=dict)
    world_size: int = 1
    coherence: Any = None

    @property
    def G_label(self) -> str:
        """``"exact"`` or ``"lower bound (top-k)"`` (k the eigenvectors examined)."""
        if not self.G_lower_bound:
            return "exact"
        k = self.G_max.num_vectors if self.G_max is not None else self.spectrum.eigenvalues.numel()
        return f"lower bound (top-{int(k)})"

    def G_text(self, digits: int = 4) -> str:
        """``"G_max = 0.0334 (exact)"``, ``"G_max >= 0.0066, lower bound (top-100)"`` or
        ``"G collapsed (reason)"``."""
        if self.G is None:
            return f"G collapsed ({self.collapse_reason})"
        if self.G_lower_bound:
            return f"G_{self.G_rule} >= {self.G:.{digits}f}, {self.G_label}"
        return f"G_{self.G_rule} = {self.G:.{digits}f} (exact)"

    def report(self) -> str:
        """A short Markdown report of the scalars."""
        st, bo = self.spectral_type, self.bulk_outliers
        name = self.names.get("model", "model")
        data = self.names.get("data", "data")
        spec = "exact (all p eigenpairs)" if self.exact else self.G_label
        lines = [f"# Analysis of {name} on {data}", "",
                 f"* parameters p = {self.num_params}; spectrum {spec}",
                 (f"* {self.G_text()}; eps = {self.eps.eps:.4f} over {self.eps.num_directions} "
                  f"random directions ({self.num_roundoff} round-off gradient(s) ignored)")]
        if self.G_max is not None and self.G_mean is not None:
            lines.append(f"* G_max = {self.G_max.value:.4f} ({self.G_max.count}/{self.G_max.total}), "
                         f"G_mean = {self.G_mean.value:.4f} ({self.G_mean.count}/{self.G_mean.total})")
        tr = "n/a" if self.trace is None else f"{self.trace:.4g}"
        lines += [(f"* trace = {tr}{'' if self.exact else ' (Hutch++ estimate)'}, "
                   f"lambda_max = {self.lambda_max:.4g}, |theta| = {self.param_norm:.4g}"),
                  f"* outliers = {self.outliers.count} (bulk edge {self.outliers.bulk_edge:.4g})"]
        if st is not None:
            lines.append(f"* spectral type {st.type} (positive share {st.positive_share:.3f}, "
                         f"zero share {st.zero_share:.3f}); Hessian measures "
                         f"{'apply' if st.applicable else 'are not read as intended'}")
        if bo is not None:
            match = bo.matches_classes
            lines.append(f"* bulk + outliers: {bo.num_outliers} outlier(s), bulk width "
                         f"{bo.bulk_width:.4g}" + ("" if match is None else
                         f"; {'matches' if match else 'does not match'} C or C-1 "
                         f"(C = {bo.num_classes})"))
        if self.margin is not None:
            lines.append(f"* margin estimate = {self.margin.margin:.4g}")
        if self.coherence is not None:
            lines.append(f"* {self.coherence.report()}")
        if self.per_class:
            lines.append("* per-class Hessians (loss over one class's training points):")
            for c, s in self.per_class.items():
                top = ", ".join(f"{float(v):.4g}" for v in s.eigenvalues[:5])
                tr = "n/a" if s.trace is None else f"{s.trace:.4g}"
                lines.append(f"  * class {c}: lambda_max = {s.lambda_max:.4g}, trace = {tr}"
                             f"{'' if s.exact else ' (Hutch++ estimate)'}; top eigenvalues {top}")
        if self.collapsed:
            lines.append(f"* collapsed: {self.collapse_reason}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "num_params": self.num_params, "exact": self.exact, "G": self.G,
            "G_rule": self.G_rule, "G_lower_bound": self.G_lower_bound, "G_label": self.G_label,
            "G_max": None if self.G_max is None else self.G_max.to_dict(),
            "G_mean": None if self.G_mean is None else self.G_mean.to_dict(),
            "eps": self.eps.eps, "eps_detail": self.eps.to_dict(), "trace": self.trace,
            "lambda_max": self.lambda_max, "param_norm": self.param_norm,
            "num_outliers": self.outliers.count, "outliers": self.outliers.to_dict(),
            "collapsed": self.collapsed, "collapse_reason": self.collapse_reason,
            "zero_grad_fraction": self.zero_grad_fraction, "num_roundoff": self.num_roundoff,
            "seconds": self.seconds,
            "top_eigenvalues": self.spectrum.eigenvalues[:25],
            "spectrum_method": self.spectrum.method,
            "spectral_type": None if self.spectral_type is None else self.spectral_type.to_dict(),
            "bulk_outliers": None if self.bulk_outliers is None else self.bulk_outliers.to_dict(),
            "num_classes": self.num_classes, "names": self.names, "world_size": self.world_size,
            "per_class_lambda_max": None if not self.per_class else {
                c: s.lambda_max for c, s in self.per_class.items()},
            "per_class": None if not self.per_class else _class_summary(self.per_class),
            "coherence": None if self.coherence is None else self.coherence.to_dict(),
            "margin": None if self.margin is None else self.margin.margin,
        }


def _class_summary(per_class: dict) -> dict:
    from .appendix import class_spectra_summary

    return class_spectra_summary(per_class)


#: ``analyze(coherence=None)`` computes the class-block gradient coherence up to this many
#: training points (the ``n x n`` Gram of the per-sample pass: 134 MB in float64 at 4096).
COHERENCE_MAX_POINTS = 4096


def _top_vectors_only(spectrum: Spectrum, keep: int) -> Spectrum:
    """The spectrum with its top-``keep`` eigenvectors only (all eigenvalues): what an
    :class:`Analysis` keeps, so that it stays small on disk (``p x keep``, not ``p x p``)."""
    V = spectrum.eigenvectors
    if V is None or V.shape[1] <= keep:
        return spectrum
    return dataclasses.replace(spectrum, eigenvectors=V[:, :keep].clone())


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed_spectrum(m: nn.Module, loss: str | Callable, local: tuple, *, k: int | None,
                          max_exact_params: int | None, memory_budget: int | None, seed: int,
                          quiet: bool) -> Spectrum:
    """The spectrum of the mean loss over every rank's shard (identical on all ranks)."""
    import torch.distributed as dist

    from ..distributed import DistributedHessianOperator, distributed_hessian_eigs

    loss_fn = loss_fn_for(loss)
    p, dt, dev = num_params(m), _model_dtype(m), _model_device(m)
    t0 = time.perf_counter()
    n = torch.tensor([float(local[0].shape[0])], dtype=torch.float64)
    total = n.clone()
    dist.all_reduce(total)
    fits = torch.tensor([1.0 if exact_spectrum_fits(p, dt, memory_budget, dev) else 0.0])
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank takes the same path
    if (max_exact_params is None or p <= max_exact_params) and bool(fits.item()):
        kw: dict[str, Any] = {"quiet": quiet}
        if memory_budget is not None:
            kw["memory_budget"] = int(memory_budget)
        if local[0].shape[0]:
            H = hbk.exact_hessian(m, loss_fn, local, dtype=dt, **kw) * float(n.item() / total.item())
        else:
            H = torch.zeros(p, p, dtype=dt, device=dev)
        dist.all_reduce(H)
        evals, evecs = torch.linalg.eigh(H)
        evals, evecs = evals.flip(0).contiguous(), evecs.flip(1).contiguous()
        dist.broadcast(evals, 0)  # one answer, bit for bit, on every rank
        dist.broadcast(evecs, 0)
        return Spectrum(evals.double(), evecs, p, True, "exact", time.perf_counter() - t0,
                        trace=float(evals.double().sum()))
    kk = min(p, k or 100)
    res = distributed_hessian_eigs(m, loss_fn, local, kk, which="LA", tol=1e-8, seed=seed,
                                   quiet=quiet)
    op = DistributedHessianOperator(m, loss_fn, local)
    trace = float(hbk.hessian_trace(op, num_probes=99, seed=seed).estimate)
    return Spectrum(res.eigenvalues.double(), res.eigenvectors, p, False, "lanczos",
                    time.perf_counter() - t0, trace=trace,
                    converged=[bool(c) for c in torch.as_tensor(res.converged).reshape(-1)])


def analyze(
    model: nn.Module,
    loss: str | Callable | tuple = "ce",
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    rule: str = "max",
    num_directions: int = 5,
    eps_seed: int = 42,
    max_exact_params: int | None = None,
    memory_budget: int | None = None,
    k: int | None = None,
    keep: int = 25,
    dtype: torch.dtype | None = torch.float64,
    min_trace: float = 1e-7,
    spectrum: Spectrum | None = None,
    roundoff_factor: float | None = ROUNDOFF_FACTOR,
    num_classes: int | None = None,
    per_class: bool = False,
    coherence: bool | None = None,
    margin: bool | dict = False,
    distributed: bool | None = None,
    names: dict | None = None,
    quiet: bool = True,
) -> Analysis:
    """The paper's analysis of any classifier on plain tensors.

    Hessian spectrum (exact whenever it fits ``memory_budget``, else the top-``k`` Lanczos part
    and a lower-bound ``G``), eps, G (both rules), trace, lambda_max, parameter norm,
    outliers, the spectral-density type and bulk/outliers readings, the training alignments,
    and optionally per-class spectra and a margin estimate.

    Example::

        an = analyze(model, "ce", (X, y))
        print(an.G_text(), an.eps.eps, an.spectral_type.type)
        an.save("analysis.json"); an = Analysis.load("analysis.json")

    Args:
        model: any ``nn.Module`` classifier with outputs ``(n, C)`` (analysed in a ``dtype``
            copy; the original is not changed).
        loss: ``"ce"``, ``"nll"``, ``"mse"`` or a callable ``loss(outputs, targets)`` returning
            the mean loss (Hessian loss and per-sample loss). For compatibility
            ``analyze(model, (X, y))`` is read as ``analyze(model, "ce", (X, y))``.
        train_data: ``(X_train (n, ...), y_train (n,))``; the Hessian uses these labels, the
            alignments the model's predictions. Under torch.distributed (``distributed``) every
            rank passes the full data and keeps its contiguous shard.
        rule: the rule reported as ``G`` (``"max"`` default, or ``"mean"``).
        num_directions, eps_seed: the threshold's random directions.
        max_exact_params: an extra cap on ``p`` for the exact path (None: memory only).
        memory_budget: bytes for the exact path (default half the available memory).
        k: Lanczos eigenpairs (default ``min(p, 100)``).
        keep: training alignments kept for figures (top ``keep`` eigenvectors).
        dtype: analysis dtype (float64 by default: a collapsed float32 Hessian is round-off).
        min_trace: a trace at or below this is a collapsed Hessian.
        spectrum: a precomputed :class:`Spectrum` of the same model and data (skips the eigh).
        roundoff_factor: ``c`` of the round-off rule (:func:`roundoff_mask`); None keeps all.
        num_classes: ``C`` for the bulk/outliers reading (default ``max(y) + 1``).
        per_class: also the spectra of the per-class Hessians (top 5 each): lambda_max,
            trace and top eigenvalues per class in ``to_dict()["per_class"]`` and the report.
        coherence: also the gradient coherence by class (block means only, a
            :class:`~hbkernels.boundary.appendix.GradientCoherence`): the mean cosine between the
            predicted-label training gradients of each pair of true classes, from the Gram
            taken in the same per-sample pass. None (default): on when
            ``n <= COHERENCE_MAX_POINTS`` (4096), ``y`` holds integer class labels and the run
            is not distributed (the Gram costs little next to the pass; a shard has no
            cross-rank terms).
        margin: also :func:`~hbkernels.boundary.margin.estimate_margin` with the top
            eigenvector (a dict gives its options, e.g. ``{"steps": 500}``).
        distributed: shard the data over the torch.distributed ranks (None: when a process
            group of more than one rank is initialised). Every rank returns the same result.
        names: ``{"model": ..., "data": ...}`` names for reports and figure titles.
        quiet: no progress bars.

    Returns:
        :class:`Analysis`.
    """
    fn = "hbk.boundary.analyze"
    if isinstance(loss, (tuple, list)) and train_data is None:
        loss, train_data = "ce", loss
    if train_data is None:
        raise TypeError(f"{fn}: expected train_data (X, y), got none")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if not (isinstance(train_data, (tuple, list)) and len(train_data) == 2
            and all(isinstance(t, torch.Tensor) for t in train_data)):
        raise TypeError(f"{fn}: expected train_data to be a pair of tensors (X, y), got "
                        f"{type(train_data).__name__}")
    if train_data[0].shape[0] != train_data[1].shape[0] or train_data[0].shape[0] == 0:
        raise ValueError(f"{fn}: expected X and y with the same number (>= 1) of rows, got "
                         f"{tuple(train_data[0].shape)} and {tuple(train_data[1].shape)}")
    if rule not in RULES:
        raise ValueError(f"{fn}: expected rule 'max' or 'mean', got {rule!r}")
    loss_name = loss if callable(loss) else _loss_name(loss)
    if margin and not isinstance(loss_name, str):
        raise ValueError(f"{fn}: expected loss 'ce', 'nll' or 'mse' for the margin estimate, "
                         f"got a callable {getattr(loss_name, '__name__', loss_name)!r}")
    _rank, world = _world()
    if distributed is None:
        distributed = world > 1
    if coherence is None:  # class labels only: a float target (soft labels) has no classes
        y0 = train_data[1]
        coherence = (not distributed and train_data[0].shape[0] <= COHERENCE_MAX_POINTS
                     and y0.dim() == 1 and not y0.is_floating_point())
    elif not isinstance(coherence, bool):
        raise TypeError(f"{fn}: expected coherence to be True, False or None, got {coherence!r}")
    elif coherence and distributed:
        raise ValueError(f"{fn}: expected coherence=False or None under torch.distributed (a "
                         "shard's Gram has no cross-rank terms), got True")
    m = as_dtype_model(model, dtype)
    was_training = m.training
    m.eval()
    X, y = _data_as(train_data, m)
    local = (X, y)
    if distributed:
        from ..distributed import shard

        local = shard((X, y))
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    tri = None  # exact spectrum: eigenvalues + alignments by tridiagonalisation, no eigenvectors
    if spectrum is None and not distributed:
        tri = _tridiagonal_spectrum(m, loss, (X, y), loss_name, keep=keep,
                                    max_exact_params=max_exact_params,
                                    memory_budget=memory_budget, quiet=quiet)
        if tri is not None:
            spectrum = tri[0]
    if spectrum is None:
        _log.info("spectrum of %s (p = %d)", (names or {}).get("model", "the model"), num_params(m))
        if distributed:
            spectrum = _distributed_spectrum(m, loss, local, k=k, max_exact_params=max_exact_params,
                                             memory_budget=memory_budget, seed=0, quiet=quiet)
        else:
            spectrum = compute_spectrum(m, (X, y), loss=loss, k=k,
                                        max_exact_params=max_exact_params, dtype=None,
                                        memory_budget=memory_budget, quiet=quiet)
    secs["spectrum"] = spectrum.seconds
    t1 = time.perf_counter()
    # One per-sample pass: eigenvector and random-direction alignments and the norms together.
    dtype, device = _model_dtype(m), _model_device(m)
    rand = random_directions(num_params(m), num_directions, eps_seed, dtype=dtype)
    vecs = spectrum.eigenvectors.to(device=device, dtype=dtype)
    _log.info("per-sample alignments of %d training points with %d vectors", X.shape[0],
              vecs.shape[1] + num_directions)
    vsets = {"rand": rand.to(device)} if tri is not None else {"eig": vecs, "rand": rand.to(device)}
    prod = hbk.per_sample_products(m, local[0], norms=True, vectors=vsets, gram=coherence,
                                   labels="pred", loss=loss_name, quiet=quiet)
    a_all = tri[1] if tri is not None else prod.alignment["eig"].detach()
    a_rand = prod.alignment["rand"].detach()
    norms = prod.norms.detach()
    if distributed:
        from ..distributed import gather_rows

        a_all, a_rand, norms = gather_rows(a_all), gather_rows(a_rand), gather_rows(norms)
    a_all, a_rand, norms = a_all.cpu(), a_rand.cpu(), norms.cpu()
    mask = tol = None
    if roundoff_factor is not None:
        tol = roundoff_tolerance(norms, dtype, factor=roundoff_factor)
        mask = norms.double() > tol
    eps = _threshold(a_rand, num_directions, eps_seed, keep=mask, tol=tol)
    if tri is not None and tri[2] is not None:
        null = tri[2] if mask is None else tri[2][mask]
        if null.numel() and float(null.max()) >= eps.eps:
            # the null space's basis would decide which of its eigenvectors count in G
            _log.warning("a training gradient has |cos| %.3g >= eps %.3g with the Hessian's "
                         "%d-dimensional null space: recomputing by tridiagonalisation",
                         float(null.max()), eps.eps, spectrum.num_params - spectrum.rank)
            tri = _tridiagonal_spectrum(m, loss, (X, y), loss_name, keep=keep,
                                        max_exact_params=max_exact_params,
                                        memory_budget=memory_budget, quiet=quiet, route="tridiag")
            spectrum = tri[0]
            a_all = tri[1]
            secs["spectrum_tridiag"] = spectrum.seconds
    coh = None
    if coherence:
        from .appendix import coherence_from_gram

        coh = coherence_from_gram(prod.gram, y.cpu(), norms=norms, keep=mask, keep_matrix=False)
    secs["per_sample"] = time.perf_counter() - t1  # the threshold and alignments: one pass
    zero_frac = float((norms == 0).double().mean())
    n_round = 0 if mask is None else int((~mask).sum())
    trace = spectrum.trace
    reason = None
    if not math.isfinite(eps.eps) or eps.eps <= 0:
        reason = f"every training gradient is zero or round-off (eps = {eps.eps})"
    elif trace is not None and trace <= min_trace:
        reason = f"Hessian trace {trace:.3g} <= {min_trace:.3g}: the minimum is numerically flat"
    elif zero_frac > 0.5:
        reason = f"{zero_frac:.0%} of the training gradients are exactly zero"
    collapsed = reason is not None
    gmax = gmean = None
    if not collapsed:
        gmax = generalization_measure(a_all, eps.eps, rule="max", num_params=spectrum.num_params,
                                      keep=mask)
        gmean = generalization_measure(a_all, eps.eps, rule="mean",
                                       num_params=spectrum.num_params, keep=mask)
    chosen = gmax if rule == "max" else gmean
    from .spectra import bulk_outliers, spectral_type

    C = int(num_classes) if num_classes is not None else int(y.max()) + 1
    st = spectral_type(spectrum.eigenvalues)
    bo = bulk_outliers(spectrum.eigenvalues, C)
    pcs = None
    if per_class:
        t2 = time.perf_counter()
        pcs = class_spectra(m, (X, y), loss=loss, max_exact_params=max_exact_params, dtype=None)
        secs["per_class"] = time.perf_counter() - t2
    mr = None
    if margin:
        from .margin import estimate_margin

        t2 = time.perf_counter()
        opts = dict(margin) if isinstance(margin, dict) else {}
        opts.setdefault("quiet", quiet)
        mr = estimate_margin(m, (X, y), spectrum.top(1)[:, 0], loss=loss_name, **opts)
        secs["margin"] = time.perf_counter() - t2
    if was_training:
        m.train()
    secs["total"] = time.perf_counter() - t0
    return Analysis(
        num_params=spectrum.num_params, exact=spectrum.exact,
        G=None if chosen is None else chosen.value, G_rule=rule,
        G_max=gmax, G_mean=gmean, G_lower_bound=a_all.shape[1] < spectrum.num_params,
        eps=eps, trace=trace,
        lambda_max=spectrum.lambda_max, param_norm=parameter_norm(model),
        outliers=count_outliers(spectrum.eigenvalues), collapsed=collapsed,
        collapse_reason=reason, zero_grad_fraction=zero_frac, seconds=secs,
        spectrum=_top_vectors_only(spectrum, keep),
        alignments=a_all[:, :keep].clone(), labels=y.cpu(), spectral_type=st, bulk_outliers=bo,
        num_roundoff=n_round, num_classes=C, per_class=pcs, margin=mr, names=dict(names or {}),
        world_size=world if distributed else 1, coherence=coh,
    )


# ----------------------------------------------------------------------------- per class
def class_spectra(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    classes: Sequence[int | Sequence[int]] | None = None,
    loss: str | Callable = "ce",
    k: int = 5,
    max_exact_params: int = 5000,
    dtype: torch.dtype | None = torch.float64,
) -> dict[str, Spectrum]:
    """Spectra of per-class Hessians: the mean loss over the training points of a class subset.

    Args:
        model: the classifier.
        data: ``(X, y)`` training data.
        classes: the subsets, each a class or a list of classes (default: every class alone).
        loss: loss name or callable (mean).
        k: eigenpairs kept (the exact path computes all, then keeps the top ``k``).
        max_exact_params, dtype: as in :func:`compute_spectrum`.

    Returns:
        ``{"0": Spectrum, "1": ..., "0+2": ...}`` keyed by the subset.
    """
    X, y = data
    if classes is None:
        classes = sorted(int(c) for c in torch.unique(y))
    out = {}
    for c in classes:
        subset = [int(c)] if isinstance(c, (int, np.integer)) else [int(v) for v in c]
        sel = torch.isin(y, torch.tensor(subset, dtype=y.dtype))
        if not sel.any():
            raise ValueError(f"hbk.boundary.class_spectra: expected training points of class {subset}, got none")
        s = compute_spectrum(model, (X[sel], y[sel]), loss=loss, k=k,
                             max_exact_params=max_exact_params, dtype=dtype)
        if s.exact:
            s = Spectrum(s.eigenvalues, s.eigenvectors[:, :k], s.num_params, True, s.method,
                         s.seconds, s.trace)
        out["+".join(str(v) for v in subset)] = s
    return out


# ----------------------------------------------------------------------------- reparameterisation
def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [mod for mod in model.modules() if isinstance(mod, nn.Linear)]


def reparameterize(model: nn.Module, alphas: Sequence[float] = (0.2, 5.0, 1.0)) -> nn.Module:
    """The function-preserving alpha-scaling of a 3-Linear-layer ReLU net (Dinh et al.).

    Scales fc1 (weight, bias) by ``a1``, fc2 weight by ``a2`` and bias by ``a1 a2``, fc3 weight
    by ``a3`` (bias unchanged). For positive alphas with ``a1 a2 a3 = 1`` and positively
    homogeneous activations (ReLU) the outputs are unchanged while the Hessian is not.

    Args:
        model: a model whose modules contain exactly three ``nn.Linear`` layers, applied in
            module order (FNN_2layer).
        alphas: ``(a1, a2, a3)``, positive, product 1 (reference: (0.2, 5.0, 1.0)).

    Returns:
        A rescaled deep copy.
    """
    fn = "hbk.boundary.reparameterize"
    a1, a2, a3 = (float(a) for a in alphas)
    if min(a1, a2, a3) <= 0 or abs(a1 * a2 * a3 - 1.0) > 1e-9:
        raise ValueError(f"{fn}: expected three positive alphas with product 1, got {tuple(alphas)}")
    out = copy.deepcopy(model)
    layers = _linear_layers(out)
    if len(layers) != 3:
        raise ValueError(f"{fn}: expected a model with 3 nn.Linear layers (FNN_2layer), got {len(layers)}")
    acts = [type(mod).__name__ for mod in out.modules() if not list(mod.children())
            and not isinstance(mod, nn.Linear)]
    act_attr = getattr(out, "activation", None)  # MLPs of boundary.models apply it functionally
    if isinstance(act_attr, str):
        acts.append(act_attr)
    if any(a.lower() in ("sigmoid", "tanh", "gelu", "silu", "elu") for a in acts):
        raise ValueError(f"{fn}: expected positively homogeneous activations (ReLU), got {acts}")
    with torch.no_grad():
        l1, l2, l3 = layers
        l1.weight.mul_(a1)
        if l1.bias is not None:
            l1.bias.mul_(a1)
        l2.weight.mul_(a2)
        if l2.bias is not None:
            l2.bias.mul_(a1 * a2)
        l3.weight.mul_(a3)
    return out


@dataclass
class ReparamReport(JsonResult):
    """Invariance of the measures under the alpha-reparameterisation."""

    alphas: tuple[float, float, float]
    max_abs_output_diff: float
    predictions_equal: bool
    before: Analysis = field(repr=False)
    after: Analysis = field(repr=False)

    @property
    def G_unchanged(self) -> bool:
        if self.before.G is None or self.after.G is None:
            return False
        # one eigenvector's worth of tolerance
        return abs(self.before.G - self.after.G) <= max(0.01 * self.before.G, 1 / self.before.num_params)

    @property
    def lambda_max_ratio(self) -> float:
        return self.after.lambda_max / self.before.lambda_max if self.before.lambda_max else math.inf

    def to_dict(self) -> dict:
        return {
            "alphas": list(self.alphas), "max_abs_output_diff": self.max_abs_output_diff,
            "predictions_equal": self.predictions_equal,
            "G_before": self.before.G, "G_after": self.after.G, "G_unchanged": self.G_unchanged,
            "G_mean_before": self.before.G_mean.value if self.before.G_mean else None,
            "G_mean_after": self.after.G_mean.value if self.after.G_mean else None,
            "lambda_max_before": self.before.lambda_max, "lambda_max_after": self.after.lambda_max,
            "lambda_max_ratio": self.lambda_max_ratio,
            "trace_before": self.before.trace, "trace_after": self.after.trace,
            "eps_before": self.before.eps.eps, "eps_after": self.after.eps.eps,
        }


def reparameterization_report(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    alphas: Sequence[float] = (0.2, 5.0, 1.0),
    inputs: torch.Tensor | None = None,
    **analyze_kw,
) -> ReparamReport:
    """Analyse a model and its alpha-reparameterisation side by side.

    Args:
        model: an FNN_2layer-like ReLU network.
        data: ``(X_train, y_train)``.
        alphas: the scaling (reference (0.2, 5.0, 1.0)).
        inputs: where to compare the outputs (default the training inputs).
        **analyze_kw: passed to :func:`analyze`.

    Returns:
        :class:`ReparamReport` (outputs/predictions unchanged, G before/after, lambda_max
        before/after).
    """
    dtype = analyze_kw.get("dtype", torch.float64)
    base = as_dtype_model(model, dtype)
    sharp = reparameterize(base, alphas)
    xs = (data[0] if inputs is None else inputs).to(_model_dtype(base))
    with torch.no_grad():
        o1, o2 = base(xs), sharp(xs)
    diff = float((o1 - o2).abs().max()) if o1.numel() else 0.0
    same = bool((o1.argmax(-1) == o2.argmax(-1)).all())
    before = analyze(base, data, **analyze_kw)
    after = analyze(sharp, data, **analyze_kw)
    return ReparamReport(tuple(float(a) for a in alphas), diff, same, before, after)


# ----------------------------------------------------------------------------- Appendix M
@dataclass
class CovarianceOverlap(JsonResult):
    """Overlaps of the top Hessian eigenvectors with the gradient-covariance eigenvectors.

    Attributes:
        betas: ``(k,)`` ``|<v_i^H, v_i^Sigma>|`` (the paper's beta_i, unsigned: eigenvector
            signs are arbitrary).
        matrix: ``(k, k)`` ``|V_H^T V_Sigma|``.
        subspace: ``(k,)`` the norm of the projection of ``v_i^H`` on span(``V_Sigma``).
        hessian_eigenvalues, covariance_eigenvalues: ``(k,)`` each.
    """

    betas: torch.Tensor
    matrix: torch.Tensor
    subspace: torch.Tensor
    hessian_eigenvalues: torch.Tensor
    covariance_eigenvalues: torch.Tensor
    covariance_vectors: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        return {"betas": self.betas, "matrix": self.matrix, "subspace": self.subspace,
                "hessian_eigenvalues": self.hessian_eigenvalues,
                "covariance_eigenvalues": self.covariance_eigenvalues}


def covariance_overlaps(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    hessian_vectors: torch.Tensor,
    hessian_eigenvalues: torch.Tensor | None = None,
    *,
    labels: str = "true",
    loss: str = "ce",
) -> CovarianceOverlap:
    """Compare the top-k Hessian eigenvectors with those of the gradient covariance (Eq. 7).

    ``Sigma = (1/n) sum_s g(x_s) g(x_s)^T`` with true-label per-sample gradients (Eq. 7;
    ``labels="pred"`` for predicted ones), eigenpairs via :func:`hbkernels.gradient_covariance_eigs`.

    Args:
        model: the classifier (same dtype as the vectors).
        data: ``(X, y)`` training data.
        hessian_vectors: ``(p, k)`` top Hessian eigenvectors (unit columns).
        hessian_eigenvalues: ``(k,)``, stored for the report.
        labels: ``"true"`` or ``"pred"``.
        loss: per-sample loss.

    Returns:
        :class:`CovarianceOverlap`.
    """
    X, y = data
    m = as_dtype_model(model, hessian_vectors.dtype)
    k = hessian_vectors.shape[1]
    kw: dict[str, Any] = {"labels": labels, "loss": loss}
    if labels == "true":
        kw["targets"] = y
    cvals, cvecs = hbk.gradient_covariance_eigs(m, X.to(hessian_vectors.dtype), k, **kw)
    cvecs = cvecs.to(hessian_vectors.dtype)
    mat = (hessian_vectors.T @ cvecs).abs()
    proj = (cvecs.T @ hessian_vectors).norm(dim=0)
    hv = hessian_eigenvalues if hessian_eigenvalues is not None else torch.full((k,), float("nan"))
    return CovarianceOverlap(betas=mat.diagonal().clone(), matrix=mat, subspace=proj,
                             hessian_eigenvalues=hv, covariance_eigenvalues=cvals,
                             covariance_vectors=cvecs)
