"""Figures of the paper (PNG, matplotlib's Agg canvas; no pyplot global state).

* :func:`plot_alignment_maps`: decision boundary plus alignment maps of the top-k eigenvectors,
  one row per model (paper Figs. 1, 2, 5, 13, 19; the plane through three inputs for
  high-dimensional data).
* :func:`plot_spectra`: eigenvalue histograms per setup with the outliers marked (Fig. 1 right).
* :func:`plot_sample_alignment`: per-sample alignment with the top 25 eigenvectors and class
  means (Fig. 2).
* :func:`plot_margins`: the margin-estimation figure (Fig. 18 right).
* :func:`plot_alignment_curves`: mean |alignment| of the training points during training.
* :func:`plot_embedding_alignment`: alignment on a 2-D embedding (t-SNE) for high-dimensional
  data (Fig. 3).
* :func:`plot_gradient_coherence`: the cosine Gram of the training gradients ordered by class,
  one heatmap per model.

Alignment colour maps are diverging (orange negative, white 0, periwinkle positive, the
reference palette) with limits fixed to [-1, 1] (a :class:`MapRow` may choose its own, e.g. the
per-row scale of the paper's Fig. 8).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap, ListedColormap
from matplotlib.figure import Figure  # PNG through the Agg canvas, no pyplot state
from matplotlib.ticker import NullFormatter

from .margin import MarginResult
from .measures import GridAlignment, boundary_mask, count_outliers

_log = logging.getLogger("hbkernels")

__all__ = [
    "ALIGNMENT_CMAP",
    "CLASS_COLORS",
    "DPI",
    "FORMATS",
    "SETUP_COLORS",
    "MapRow",
    "g_note",
    "plot_alignment_curves",
    "plot_alignment_maps",
    "plot_embedding_alignment",
    "plot_gradient_coherence",
    "plot_margins",
    "plot_sample_alignment",
    "plot_spectra",
    "tsne_embedding",
]

ALIGNMENT_CMAP = LinearSegmentedColormap.from_list(
    "hbk_alignment", [(242 / 255, 172 / 255, 45 / 255), (1, 1, 1), (143 / 255, 146 / 255, 227 / 255)],
    N=100,
)
CLASS_COLORS = ["#33BBEE", "#EE3377", "#009988", "#FFAABB", "#EE7733", "#0077BB", "#BBBBBB",
                "#CC3311", "#DDCC77", "#332288"]
SETUP_COLORS = {"normal": "#332288", "adversarial": "#44AA99", "large-norm": "#AA4499",
                "sharper": "#CC6677", "wide-margin": "#DDAA33", "random-label": "#888888"}
_MARKERS = ["s", "o", "d", "^", "v", "P", "X", "*", "<", ">"]


def _np(a) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


#: Print resolution of the PNG figures.
DPI = 300
#: Formats written by every figure function: the path given (``.png``) and a vector PDF beside it.
FORMATS = ("png", "pdf")


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``path`` and, for a ``.png`` path, the same figure as ``.pdf`` beside it."""
    from ..fileio import atomic_savefig

    path = Path(path)
    atomic_savefig(fig, path, dpi=dpi, bbox_inches="tight")
    if path.suffix.lower() == ".png" and "pdf" in FORMATS:
        atomic_savefig(fig, path.with_suffix(".pdf"), dpi=dpi, bbox_inches="tight")
    _log.debug("wrote %s", path)
    return path


def g_note(G: float | None, *, lower_bound: bool, rule: str = "max", k: int | None = None,
           digits: int = 3) -> str:
    """The figure label of G: ``"G_max = 0.033 (exact)"`` or ``"G_max >= 0.007, lower bound
    (top-100)"``; ``"G collapsed"`` for None."""
    if G is None:
        return "G collapsed"
    if lower_bound:
        top = f" (top-{k})" if k else ""
        return f"G_{rule} >= {G:.{digits}f}, lower bound{top}"
    return f"G_{rule} = {G:.{digits}f} (exact)"


def _class_color(c: int) -> str:
    return CLASS_COLORS[c % len(CLASS_COLORS)]


def _scatter_classes(ax, X: np.ndarray, y: np.ndarray, size: float = 4, color: str | None = "k",
                     legend: bool = False) -> None:
    for c in np.unique(y):
        sel = y == c
        ax.scatter(X[sel, 0], X[sel, 1], s=size, marker=_MARKERS[int(c) % len(_MARKERS)],
                   c=color or _class_color(int(c)), linewidths=0, label=f"class {int(c)}")
    if legend:
        ax.legend(fontsize=6, loc="best", markerscale=2)


@dataclass
class MapRow:
    """One row of :func:`plot_alignment_maps`.

    Attributes:
        label: row label (e.g. "normal", "epoch 10").
        grid: the maps (``(k, ny, nx)``) and predicted classes.
        eigenvalues: ``(k,)`` eigenvalues of the vectors (x-labels), or None.
        X: ``(n, 2)`` points to draw (training data, in the grid's coordinates), or None.
        y: ``(n,)`` their labels.
        note: extra text under the row label (e.g. "G = 0.061").
        anchors: ``[(x, y, text)]`` points to mark (the plane's three inputs).
        axis_labels: names of the two grid axes.
        vmax: colour limits ``[-vmax, vmax]`` of the row's maps (1: cosines); None: the row's
            largest ``|value|`` (per-row scale, the paper's Fig. 8).
        cbar_label: colour-bar label.
    """

    label: str
    grid: GridAlignment
    eigenvalues: Sequence[float] | torch.Tensor | None = None
    X: torch.Tensor | np.ndarray | None = None
    y: torch.Tensor | np.ndarray | None = None
    note: str = ""
    anchors: list[tuple[float, float, str]] = field(default_factory=list)
    axis_labels: tuple[str, str] = ("$x_1$", "$x_2$")
    vmax: float | None = 1.0
    cbar_label: str = "Alignment"


def _row_vmax(row: MapRow) -> float:
    if row.vmax is not None:
        return float(row.vmax)
    peak = float(row.grid.maps.abs().max()) if row.grid.maps.numel() else 0.0
    return peak if peak > 0 else 1.0


def plot_alignment_maps(
    rows: Sequence[MapRow],
    path: str | Path,
    *,
    k: int | None = None,
    title: str | None = None,
    dpi: int = DPI,
    vector_names: Sequence[str] | None = None,
) -> Path:
    """Decision boundary and alignment maps ``A_i`` of the top-k vectors, one row per model.

    Column 0: predicted classes (light), the decision boundary (black, Sobel rule) and the
    points. Columns 1..k: ``A_i`` on the grid, diverging colours fixed to [-1, 1], x-label
    ``lambda_i``; one colour bar per row (limits ``MapRow.vmax``).

    Args:
        rows: the models.
        path: output PNG.
        k: vectors per row (default: all of the first row's maps).
        title: figure title.
        dpi: resolution.
        vector_names: column titles (default ``v_1 .. v_k``).

    Returns:
        The written path.
    """
    if not rows:
        raise ValueError("hbk.boundary.plot_alignment_maps: expected at least one row, got none")
    k = int(rows[0].grid.maps.shape[0]) if k is None else k
    fig = Figure(figsize=(1.9 * (k + 1) + 0.6, 1.9 * len(rows) + (0.4 if title else 0)))
    axes = fig.subplots(len(rows), k + 2, squeeze=False,
                        gridspec_kw={"width_ratios": [1] * (k + 1) + [0.06]})
    for r, row in enumerate(rows):
        g = row.grid
        xs, ys = _np(g.xs), _np(g.ys)
        pred = _np(g.pred).astype(int)
        ax = axes[r, 0]
        ncls = int(pred.max()) + 1 if pred.size else 1
        cmap = ListedColormap([_class_color(c) for c in range(max(ncls, 1))])
        ax.pcolormesh(xs, ys, pred, cmap=cmap, vmin=-0.5, vmax=max(ncls, 1) - 0.5,
                      shading="nearest", alpha=0.25, rasterized=True)
        mask = boundary_mask(pred)
        if mask.any():
            by, bx = np.nonzero(mask)
            ax.scatter(xs[bx], ys[by], s=0.6, c="k", linewidths=0)
        if row.X is not None and row.y is not None:
            _scatter_classes(ax, _np(row.X), _np(row.y).astype(int), size=5, color=None)
        ax.set_ylabel(row.label + (f"\n{row.note}" if row.note else ""), fontsize=8)
        if r == 0:
            ax.set_title("decision boundary", fontsize=8)
        mesh = None
        vlim = _row_vmax(row)
        for i in range(k):
            ax = axes[r, i + 1]
            if i >= g.maps.shape[0]:
                ax.set_axis_off()
                continue
            mesh = ax.pcolormesh(xs, ys, _np(g.maps[i]), cmap=ALIGNMENT_CMAP, vmin=-vlim,
                                 vmax=vlim, shading="nearest", rasterized=True)
            if row.X is not None:
                Xn = _np(row.X)
                ax.scatter(Xn[:, 0], Xn[:, 1], s=1.5, c="k", linewidths=0)
            if r == 0:
                ax.set_title(vector_names[i] if vector_names else f"$v_{{{i + 1}}}$", fontsize=9)
            if row.eigenvalues is not None and i < len(row.eigenvalues):
                ax.set_xlabel(rf"$\lambda_{{{i + 1}}}$ = {float(row.eigenvalues[i]):.3g}",
                              fontsize=8)
        for j in range(k + 1):
            ax = axes[r, j]
            ax.set_xlim(xs[0], xs[-1])
            ax.set_ylim(ys[0], ys[-1])
            ax.set_xticks([])
            ax.set_yticks([])
            for ax_x, ax_y, text in row.anchors:
                ax.scatter([ax_x], [ax_y], s=25, facecolors="none", edgecolors="k", linewidths=1)
                if j == 0:
                    ax.annotate(text, (ax_x, ax_y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        if mesh is not None:
            cb = fig.colorbar(mesh, cax=axes[r, -1])
            cb.set_label(row.cbar_label, fontsize=7)
            cb.ax.tick_params(labelsize=6)
        else:
            axes[r, -1].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_spectra(
    spectra: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    bins: int = 200,
    gap_fraction: float = 0.05,
    dpi: int = DPI,
) -> Path:
    """Histograms of all eigenvalues, one panel per setup (density, log y), outliers marked.

    Outliers (the gap rule of :func:`~hbkernels.boundary.measures.count_outliers`) are marked
    by a rug (red ticks) on the eigenvalue axis at their values; the legend gives their number.

    Args:
        spectra: ``{setup label: eigenvalues}``.
        path: output PNG.
        bins: histogram bins (reference 200).
        gap_fraction: outlier rule parameter.
        dpi: resolution.

    Returns:
        The written path.
    """
    if not spectra:
        raise ValueError("hbk.boundary.plot_spectra: expected at least one spectrum, got none")
    fig = Figure(figsize=(3.2, 1.9 * len(spectra)))
    axes = fig.subplots(len(spectra), 1, squeeze=False)[:, 0]
    for ax, (label, ev) in zip(axes, spectra.items()):
        e = _np(ev).reshape(-1)
        color = SETUP_COLORS.get(label.split()[0], "#332288")
        hist, _, _ = ax.hist(e, bins=bins, density=True, color=color, log=True)
        out = count_outliers(e, gap_fraction=gap_fraction)
        ytop = hist[hist > 0].max() if (hist > 0).any() else 1.0
        ax.set_ylim(top=ytop * 5)
        if out.count:  # a rug on the eigenvalue axis: x in data units, y in axes units
            ax.plot(out.outlier_values, np.zeros(out.count), linestyle="none", marker="|",
                    markersize=9, markeredgewidth=1.2, c="#CC3311", clip_on=False, zorder=5,
                    transform=ax.get_xaxis_transform(),
                    label=f"{out.count} outlier{'s' if out.count != 1 else ''}")
            ax.legend(fontsize=6, loc="upper right", handlelength=1)
        else:
            ax.text(0.98, 0.95, "no outliers", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7)
        ax.set_ylabel(rf"P($\lambda$) {label}", fontsize=8)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.xaxis.get_offset_text().set_fontsize(7)
        ax.tick_params(labelsize=7)
    axes[0].set_title("eigenspectrum", fontsize=9)
    axes[-1].set_xlabel(r"$\lambda_i$", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_sample_alignment(
    panels: Mapping[str, tuple[torch.Tensor, torch.Tensor, str]],
    path: str | Path,
    *,
    k: int = 25,
    dpi: int = DPI,
) -> Path:
    """Signed alignment of every training point with the top-k eigenvectors, class means bold.

    Args:
        panels: ``{label: (alignments (n, >=k), labels (n,), text)}``; text goes in a box
            (e.g. G, trace, lambda_1).
        path: output PNG.
        k: eigenvectors shown (reference 25 / 8*C).
        dpi: resolution.

    Returns:
        The written path.
    """
    if not panels:
        raise ValueError("hbk.boundary.plot_sample_alignment: expected at least one panel, got none")
    fig = Figure(figsize=(4.2 * len(panels), 2.2))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (label, (A, y, text)) in zip(axes, panels.items()):
        a = _np(A)[:, :k]
        yy = _np(y).astype(int)
        idx = np.arange(1, a.shape[1] + 1)
        for c in np.unique(yy):
            rows = a[yy == c]
            for row in rows:
                ax.plot(idx, row, c=_class_color(int(c)), lw=0.5, alpha=0.12)
            ax.plot(idx, rows.mean(0), c=_class_color(int(c)), lw=2.5, label=f"class {int(c)}")
        ax.set_xlim(a.shape[1], 1)
        ax.set_ylim(-1, 1)
        ax.axhline(0, c="k", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("i-th largest eigenvalue", fontsize=8)
        ax.tick_params(labelsize=7)
        if text:
            ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=7, va="bottom",
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    axes[0].set_ylabel(r"alignment $\mathcal{A}_i(x_s)$", fontsize=8)
    axes[-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_margins(
    panels: Sequence[tuple[str, GridAlignment, MarginResult]],
    X: torch.Tensor,
    y: torch.Tensor,
    path: str | Path,
    *,
    dpi: int = DPI,
) -> Path:
    """The margin figure: boundary, ``x_b`` (red), ``x_t^max`` (purple +), ``x_t^min`` (orange -).

    Args:
        panels: ``[(label, grid with the predicted classes, margin result)]``.
        X, y: training points (2-D).
        path: output PNG.
        dpi: resolution.

    Returns:
        The written path.
    """
    if not panels:
        raise ValueError("hbk.boundary.plot_margins: expected at least one panel, got none")
    fig = Figure(figsize=(3.0 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    Xn, yn = _np(X), _np(y).astype(int)
    for ax, (label, grid, res) in zip(axes, panels):
        xs, ys = _np(grid.xs), _np(grid.ys)
        mask = boundary_mask(grid.pred)
        ax.pcolormesh(xs, ys, mask.astype(float), cmap="Greys", vmin=0, vmax=1.5,
                      shading="nearest", rasterized=True)
        _scatter_classes(ax, Xn, yn, size=4)
        xr = _np(res.x_restarts).reshape(len(res.restart_margin), -1)
        ax.scatter(xr[:, 0], xr[:, 1], s=10, marker="x", c="#CC3311", alpha=0.5, linewidths=0.8)
        xmax, xmin, xb = _np(res.x_max), _np(res.x_min), _np(res.x_b)
        ax.scatter(*xmax, s=100, c="#8F92E3", alpha=0.6)
        ax.scatter(*xmax, s=40, marker="+", c="k")
        ax.scatter(*xmin, s=100, c="#F2AC2D", alpha=0.6)
        ax.scatter(*xmin, s=40, marker="_", c="k")
        ax.scatter(*xb, s=30, c="red", zorder=5)
        for target in (xmax, xmin):
            ax.plot([xb[0], target[0]], [xb[1], target[1]], c="red", lw=0.6, ls="--")
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.set_title(f"{label}\nmargin = {res.margin:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="0.45", lw=2, label="decision boundary"),
        Line2D([], [], ls="none", marker="x", color="#CC3311", label="search restarts"),
        Line2D([], [], ls="none", marker="o", color="red", label=r"$x_b$ (boundary point)"),
        Line2D([], [], ls="none", marker="P", color="#8F92E3",
               label=r"$x_t^{max}$ (max $\mathcal{A}_1$)"),
        Line2D([], [], ls="none", marker="o", color="#F2AC2D",
               label=r"$x_t^{min}$ (min $\mathcal{A}_1$)"),
        Line2D([], [], color="red", ls="--", lw=0.8, label="distances (margin = min)"),
    ] + [Line2D([], [], ls="none", marker=_MARKERS[int(c) % len(_MARKERS)], color="k",
                markersize=4, label=f"class {int(c)}") for c in np.unique(yn)]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=6,
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path, dpi)


def plot_alignment_curves(
    epochs: Sequence[int],
    alignments: Sequence[torch.Tensor],
    path: str | Path,
    *,
    k: int = 5,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Mean ``|A_i|`` of the training points with the top-k eigenvectors over training.

    Args:
        epochs: checkpoint epochs.
        alignments: per checkpoint, ``(n, >=k)`` alignments with that checkpoint's top
            eigenvectors.
        path: output PNG.
        k: eigenvectors (one curve each).
        title: figure title.
        dpi: resolution.

    Returns:
        The written path.
    """
    if len(epochs) != len(alignments) or not epochs:
        raise ValueError("hbk.boundary.plot_alignment_curves: expected one alignment matrix per "
                         f"epoch, got {len(epochs)} epochs and {len(alignments)} matrices")
    m = np.stack([np.abs(_np(a)[:, :k]).mean(0) for a in alignments])
    fig = Figure(figsize=(4.0, 2.6))
    ax = fig.subplots()
    for i in range(m.shape[1]):
        ax.plot(epochs, m[:, i], marker="o", ms=3, label=f"$v_{{{i + 1}}}$")
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel(r"mean $|\mathcal{A}_i|$ (training points)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=min(k, 5))
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def tsne_embedding(X: torch.Tensor, *, seed: int = 42, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE of the flattened inputs (scikit-learn; reference random_state 42).

    Args:
        X: ``(n, ...)`` inputs.
        seed: random state.
        perplexity: capped at ``(n - 1) / 3``.

    Returns:
        ``(n, 2)``.
    """
    from sklearn.manifold import TSNE

    flat = _np(X).reshape(X.shape[0], -1)
    perp = float(min(perplexity, max(1.0, (flat.shape[0] - 1) / 3)))
    return TSNE(n_components=2, random_state=seed, perplexity=perp, init="pca").fit_transform(flat)


def plot_embedding_alignment(
    rows: Sequence[tuple[str, np.ndarray, torch.Tensor, torch.Tensor, Sequence[float]]],
    path: str | Path,
    *,
    k: int = 5,
    spectra: Sequence[torch.Tensor] | None = None,
    dpi: int = DPI,
) -> Path:
    """Alignment of the training points on a 2-D embedding (t-SNE), one row per model.

    Column 0: the embedding coloured by class; columns 1..k: coloured by ``A_i`` (fixed
    [-1, 1]); an optional last column: the eigenvalue histogram.

    Args:
        rows: ``[(label, embedding (n, 2), labels (n,), alignments (n, >=k), eigenvalues)]``.
        path: output PNG.
        k: eigenvectors shown.
        spectra: per row, all eigenvalues for the histogram column.
        dpi: resolution.

    Returns:
        The written path.
    """
    if not rows:
        raise ValueError("hbk.boundary.plot_embedding_alignment: expected at least one row, got none")
    extra = 1 if spectra is not None else 0
    fig = Figure(figsize=(2.0 * (k + 1 + extra) + 0.6, 2.0 * len(rows)))
    axes = fig.subplots(len(rows), k + 2 + extra, squeeze=False,
                        gridspec_kw={"width_ratios": [1] * (k + 1) + [0.06] + [1.2] * extra})
    for r, (label, emb, y, A, ev) in enumerate(rows):
        e, yy, a = _np(emb), _np(y).astype(int), _np(A)
        ax = axes[r, 0]
        for c in np.unique(yy):
            sel = yy == c
            ax.scatter(e[sel, 0], e[sel, 1], s=4, c=_class_color(int(c)), label=str(int(c)),
                       linewidths=0)
        ax.legend(fontsize=6, markerscale=2, loc="best")
        ax.set_ylabel(label, fontsize=8)
        sc = None
        for i in range(k):
            ax = axes[r, i + 1]
            if i >= a.shape[1]:
                ax.set_axis_off()
                continue
            sc = ax.scatter(e[:, 0], e[:, 1], s=4, c=a[:, i], cmap=ALIGNMENT_CMAP, vmin=-1, vmax=1,
                            linewidths=0)
            if r == 0:
                ax.set_title(f"$v_{{{i + 1}}}$", fontsize=9)
            if i < len(ev):
                ax.set_xlabel(rf"$\lambda_{{{i + 1}}}$ = {float(ev[i]):.3g}", fontsize=8)
        for j in range(k + 1):
            axes[r, j].set_xticks([])
            axes[r, j].set_yticks([])
        if sc is not None:
            cb = fig.colorbar(sc, cax=axes[r, k + 1])
            cb.set_label("Alignment", fontsize=7)
            cb.ax.tick_params(labelsize=6)
        else:
            axes[r, k + 1].set_axis_off()
        if spectra is not None:
            ax = axes[r, -1]
            ax.hist(_np(spectra[r]).reshape(-1), bins=200, density=True, log=True, color="#332288")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=6, which="both")
            ax.set_xlabel(r"$\lambda_i$", fontsize=7)
            if r == 0:
                ax.set_title("eigenspectrum", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_gradient_coherence(
    panels: Mapping[str, object],
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Cosines between the training gradients, rows and columns ordered by class.

    Diverging colours fixed to [-1, 1]; class blocks are separated by lines and labelled; the
    panel title gives the within- and between-class mean cosines (block means without
    ``i = j``).

    Args:
        panels: ``{label: GradientCoherence}`` with the ``(n, n)`` cosines kept
            (:func:`~hbkernels.boundary.appendix.gradient_coherence`).
        path: output PNG.
        title: figure title.
        dpi: resolution.

    Returns:
        The written path.
    """
    fn = "hbk.boundary.plot_gradient_coherence"
    if not panels:
        raise ValueError(f"{fn}: expected at least one panel, got none")
    for label, c in panels.items():
        if getattr(c, "cosine", None) is None:
            raise ValueError(f"{fn}: expected panel {label!r} to be a GradientCoherence with its "
                             f"(n, n) cosines kept, got {type(c).__name__} without them")
    fig = Figure(figsize=(3.2 * len(panels) + 0.5, 3.4 + (0.3 if title else 0)))
    axes = fig.subplots(1, len(panels) + 1, squeeze=False,
                        gridspec_kw={"width_ratios": [1] * len(panels) + [0.05]})[0]
    img = None
    for ax, (label, c) in zip(axes, panels.items()):
        cos, lab = _np(c.cosine), _np(c.sorted_labels).astype(int)
        n = cos.shape[0]
        img = ax.imshow(cos, cmap=ALIGNMENT_CMAP, vmin=-1, vmax=1, interpolation="nearest",
                        extent=(0, n, n, 0), rasterized=True)
        edges = np.flatnonzero(np.diff(lab)) + 1
        for e in edges:
            ax.axhline(e, c="k", lw=0.6)
            ax.axvline(e, c="k", lw=0.6)
        bounds = np.concatenate([[0], edges, [n]])
        mids = (bounds[:-1] + bounds[1:]) / 2
        names = [str(int(lab[b])) for b in bounds[:-1]]
        ax.set_xticks(mids, names, fontsize=7)
        ax.set_yticks(mids, names, fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel("true class", fontsize=8)
        ax.set_title(f"{label}\nwithin {c.within_class:.2f}, between {c.between_class:.2f}",
                     fontsize=8)
    axes[0].set_ylabel("true class", fontsize=8)
    cb = fig.colorbar(img, cax=axes[-1])
    cb.set_label(r"$\cos(g(x_i), g(x_j))$", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)
