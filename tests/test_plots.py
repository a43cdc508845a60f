"""Every figure of hbkernels.boundary.plots writes a non-empty PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hbkernels.boundary import plots as P
from hbkernels.boundary.margin import MarginResult
from hbkernels.boundary.measures import GridAlignment, make_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def _grid(k=3, res=24):
    xs, ys, pts = make_grid((-2, 2, -2, 2), res)
    pred = (pts[:, 0] > 0).long() + (pts[:, 1] > 1).long()
    maps = torch.stack([torch.tanh(pts[:, 0] * (i + 1)) * torch.exp(-pts[:, 1] ** 2) for i in range(k)])
    return GridAlignment(xs, ys, pred.reshape(res, res), maps.reshape(k, res, res))


def _data(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=gen)
    return X, (X[:, 0] > 0).long()


def test_alignment_maps_png(tmp_path):
    X, y = _data()
    rows = [P.MapRow("normal", _grid(), [0.1, 0.02, 0.01], X, y, note="G = 0.05"),
            P.MapRow("plane", _grid(), None, anchors=[(0, 0, "x0"), (1, 0, "x1"), (0, 1, "x2")],
                     axis_labels=("a", "b"))]
    _assert_png(P.plot_alignment_maps(rows, tmp_path / "maps.png", title="t"))
    with pytest.raises(ValueError, match="at least one row"):
        P.plot_alignment_maps([], tmp_path / "x.png")


def test_spectra_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    bulk = torch.randn(500, generator=gen, dtype=torch.float64) * 1e-3
    spectra = {"normal": torch.cat([bulk, torch.tensor([0.1, 0.03], dtype=torch.float64)]),
               "adversarial": torch.cat([bulk, torch.tensor([0.01, 0.008, 0.005], dtype=torch.float64)])}
    _assert_png(P.plot_spectra(spectra, tmp_path / "spec.png"))


def test_sample_alignment_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    A = torch.rand(20, 25, generator=gen) * 2 - 1
    y = torch.arange(20) % 3
    _assert_png(P.plot_sample_alignment({"normal": (A, y, "G = 0.1"), "adversarial": (A, y, "")},
                                        tmp_path / "samples.png"))


def test_margin_png(tmp_path):
    X, y = _data()
    res = MarginResult(margin=0.5, x_b=torch.tensor([0.0, 0.1]), x_max=X[0], x_min=X[1],
                       idx_max=0, idx_min=1, cos_max=0.9, cos_min=-0.8, dist_max=0.5,
                       dist_min=0.7, chosen=0, restart_objective=[0.1, 0.2],
                       restart_cos=[0.9, 0.8], restart_margin=[0.5, 0.6], settings={},
                       seconds=0.1, x_restarts=torch.tensor([[0.0, 0.1], [0.2, 0.3]]))
    _assert_png(P.plot_margins([("normal", _grid(), res), ("wide", _grid(), res)], X, y,
                               tmp_path / "margin.png"))


def test_alignment_curves_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mats = [torch.rand(10, 5, generator=gen) for _ in range(4)]
    _assert_png(P.plot_alignment_curves([0, 10, 20, 30], mats, tmp_path / "dyn.png", title="t"))
    with pytest.raises(ValueError, match="one alignment matrix per"):
        P.plot_alignment_curves([0, 1], mats, tmp_path / "x.png")


def test_embedding_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 1, 4, 4, generator=gen)
    y = torch.arange(40) % 3
    emb = P.tsne_embedding(X, seed=0)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()
    np.testing.assert_allclose(emb, P.tsne_embedding(X, seed=0))
    A = torch.rand(40, 5, generator=gen) * 2 - 1
    ev = torch.linspace(1, 0, 300)
    _assert_png(P.plot_embedding_alignment([("normal", emb, y, A, ev[:5])], tmp_path / "emb.png",
                                           spectra=[ev]))


# ----------------------------------------------------------------------------- issue 10 defects
@pytest.fixture
def figures(monkeypatch):
    """The Figure objects the plot functions save (still written to disk)."""
    seen = []
    save = P._save

    def spy(fig, path, dpi):
        seen.append((fig, dpi))
        return save(fig, path, dpi)

    monkeypatch.setattr(P, "_save", spy)
    return seen


def test_png_and_pdf_at_print_resolution(tmp_path):
    from PIL import Image

    X, y = _data()
    path = P.plot_alignment_maps([P.MapRow("mine", _grid(), None, X, y)], tmp_path / "m.png")
    assert Image.open(path).info["dpi"][0] == pytest.approx(300, abs=1) and P.DPI == 300
    pdf = path.with_suffix(".pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and len(pdf) > 1000


def test_spectra_outliers_are_a_rug_on_the_eigenvalue_axis(tmp_path, figures):
    bulk = torch.linspace(-1e-3, 1e-3, 300, dtype=torch.float64)
    ev = torch.cat([bulk, torch.tensor([0.1, 0.03], dtype=torch.float64)])
    P.plot_spectra({"my net": ev}, tmp_path / "s.png")
    ax = figures[-1][0].axes[0]
    rugs = [ln for ln in ax.get_lines() if ln.get_marker() == "|"]
    assert len(rugs) == 1
    assert sorted(rugs[0].get_xdata()) == pytest.approx([0.03, 0.1])
    assert list(rugs[0].get_ydata()) == [0, 0]  # y in axes units: on the eigenvalue axis
    assert rugs[0].get_transform() == ax.get_xaxis_transform()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["2 outliers"]
    assert "my net" in ax.get_ylabel()


def test_margin_figure_has_a_legend_and_titles_use_the_labels(tmp_path, figures):
    X, y = _data()
    res = MarginResult(margin=0.5, x_b=torch.tensor([0.0, 0.1]), x_max=X[0], x_min=X[1],
                       idx_max=0, idx_min=1, cos_max=0.9, cos_min=-0.8, dist_max=0.5,
                       dist_min=0.7, chosen=0, restart_objective=[0.1], restart_cos=[0.9],
                       restart_margin=[0.5], settings={}, seconds=0.1,
                       x_restarts=torch.tensor([[0.0, 0.1]]))
    P.plot_margins([("my model", _grid(), res)], X, y, tmp_path / "margin.png")
    fig = figures[-1][0]
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert "decision boundary" in labels and any("x_b" in t for t in labels)
    assert any("x_t^{max}" in t for t in labels) and "class 0" in labels
    A = torch.rand(20, 5) * 2 - 1
    P.plot_sample_alignment({"half-moon": (A, torch.arange(20) % 2, "")}, tmp_path / "s.png")
    assert figures[-1][0].axes[0].get_title() == "half-moon"  # not "half-moon initialization"


def test_g_note_says_exact_or_lower_bound():
    assert P.g_note(0.0334, lower_bound=False) == "G_max = 0.033 (exact)"
    assert P.g_note(0.0066, lower_bound=True, rule="mean", k=100) == \
        "G_mean >= 0.007, lower bound (top-100)"
    assert P.g_note(None, lower_bound=False) == "G collapsed"
