"""The paper's appendix analyses (hbkernels.boundary.appendix and the options they added to
measures and plots) against ground truth.

Ground truth: per-sample gradients by vmap(grad) (persample_refs.ref_grads), Hessians by
torch.autograd.functional.hessian (curvature_refs.ce_hessian) and torch.linalg.eigh.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from curvature_refs import ce_hessian
from persample_refs import pred, ref_grads
from torch import nn

from hbkernels.boundary import appendix as A
from hbkernels.boundary import measures as M
from hbkernels.boundary import plots as P

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures
def blobs(n_per=12, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[2.0, -1.0], [-2.0, 0.0], [0.0, 2.0]])
    X = torch.cat([means[c] + 0.6 * torch.randn(n_per, 2, generator=gen) for c in range(3)])
    return X.to(dtype), torch.arange(3).repeat_interleave(n_per)


def mlp(width=7, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3)).to(dtype)


@functools.cache
def _trained(width):
    X, y = blobs()
    model = mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def trained(width=7):
    """A 2-w-w-3 ReLU net trained on three blobs (36 points; cached, copies returned)."""
    model, X, y = _trained(width)
    return copy.deepcopy(model), X.clone(), y.clone()


def ref_cos(G, V):
    return (G @ V) / (G.norm(dim=1, keepdim=True) * V.norm(dim=0, keepdim=True))


# ----------------------------------------------------------------------------- App. D
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_scalar_product_matches_vmap(dtype):
    model = mlp(5, seed=1, dtype=dtype)
    X = torch.randn(13, 2, dtype=dtype)
    V = 3.0 * torch.randn(M.num_params(model), 4, dtype=dtype)  # not unit: |v| is not divided
    G = ref_grads(model, X, pred(model, X))
    got = M.gradient_alignment(model, X, V, normalize=False, batch_size=5)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = float((G @ V).abs().max())
    torch.testing.assert_close(got, G @ V, rtol=tol, atol=tol * scale)
    cos = M.gradient_alignment(model, X, V)
    torch.testing.assert_close(cos, ref_cos(G, V), rtol=tol, atol=tol)
    with pytest.raises(TypeError, match="hbk.boundary.gradient_alignment: expected normalize"):
        M.gradient_alignment(model, X, V, normalize="no")


def test_alignment_map_scalar_product_on_grid_and_plane():
    model, X, y = trained()
    V = M.compute_spectrum(model, (X, y)).top(3)
    sp = M.alignment_map(model, (-3, 3, -3, 3), V, resolution=7, normalize=False)
    cos = M.alignment_map(model, (-3, 3, -3, 3), V, resolution=7)
    assert not sp.normalized and cos.normalized and sp.maps.shape == (3, 7, 7)
    _, _, pts = M.make_grid((-3, 3, -3, 3), 7, dtype=torch.float64)
    G = ref_grads(model, pts, pred(model, pts))
    want = (G @ V).T.reshape(3, 7, 7)
    torch.testing.assert_close(sp.maps, want, rtol=1e-9, atol=1e-12)
    # the cosine is the scalar product over |g| (unit eigenvectors): App. D's normalisation
    gn = G.norm(dim=1).reshape(7, 7)
    torch.testing.assert_close(cos.maps * gn, sp.maps, rtol=1e-8, atol=1e-12)
    assert torch.equal(sp.pred, cos.pred)
    plane = M.alignment_map(model, [X[0], X[12], X[24]], V, resolution=5, normalize=False)
    _, _, ppts = M.plane_grid(X[0], X[12], X[24], 5)
    Gp = ref_grads(model, ppts, pred(model, ppts))
    torch.testing.assert_close(plane.maps, (Gp @ V).T.reshape(3, 5, 5), rtol=1e-9, atol=1e-12)
    assert not plane.normalized and plane.to_dict()["normalized"] is False


# ----------------------------------------------------------------------------- App. E
def test_family_vectors_pick_the_four_families():
    model, X, y = trained()
    spec = M.compute_spectrum(model, (X, y))
    fam = A.family_vectors(spec, 4, seed=3)
    assert list(fam) == ["top", "bottom", "random_eigenvectors", "random_directions"]
    V, ev = spec.eigenvectors, spec.eigenvalues
    assert torch.equal(fam["top"][0], V[:, :4]) and torch.equal(fam["top"][1], ev[:4])
    assert torch.equal(fam["bottom"][1], ev[-4:].flip(0))  # v_{-1}: the smallest eigenvalue
    assert float(fam["bottom"][1][0]) == float(ev.min())
    ridx = [int((ev == e).nonzero()[0]) for e in fam["random_eigenvectors"][1]]
    assert all(4 <= i < spec.num_params - 4 for i in ridx) and ridx == sorted(ridx)
    R, none = fam["random_directions"]
    assert none is None and R.shape == (spec.num_params, 4)
    torch.testing.assert_close(R.norm(dim=0), torch.ones(4, dtype=R.dtype))
    with pytest.raises(ValueError, match="hbk.boundary.family_vectors: expected 3 k <= p"):
        A.family_vectors(spec, spec.num_params)
    top_only = M.Spectrum(ev[:5], V[:, :5], spec.num_params, False, "lanczos", 0.0)
    with pytest.raises(ValueError, match="expected a spectrum with all"):
        A.family_vectors(top_only)


def test_direction_families_exact_values_and_ordering():
    model, X, y = trained(width=20)
    spec = M.compute_spectrum(model, (X, y))
    fams = A.family_vectors(spec, 5, seed=0)
    res = A.direction_families(model, X, fams)
    # direct computation: predicted-label gradients, the round-off rule, cosines
    G = ref_grads(model, X, pred(model, X))
    gn = G.norm(dim=1)
    keep = gn > M.ROUNDOFF_FACTOR * torch.finfo(torch.float32).eps * gn.max()
    thr = M.random_direction_threshold(model, X)
    assert res.eps == pytest.approx(thr.eps, rel=1e-10) and res.num_points == int(keep.sum())
    assert res.num_roundoff == int((~keep).sum())
    for name, (V, ev) in fams.items():
        a = ref_cos(G[keep], V).abs()
        f = res.families[name]
        torch.testing.assert_close(f.mean_abs, a.mean(0), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(f.max_abs, a.amax(0), rtol=1e-8, atol=1e-12)
        assert f.count_max == int((a.amax(0) >= thr.eps).sum())
        assert f.count_mean == int((a.mean(0) > thr.eps).sum())
    # App. E: only the top eigenvectors align with the training gradients
    fm = {k: float(f.mean_abs.mean()) for k, f in res.families.items()}
    assert fm["top"] > 5 * max(fm["bottom"], fm["random_eigenvectors"], fm["random_directions"])
    assert res.families["top"].count_mean == 5 and res.families["random_directions"].count_mean == 0
    # the eps directions themselves as a family: their mean max is eps, by definition
    same = A.direction_families(model, X, {"r": M.random_directions(spec.num_params, 5, 42)})
    assert float(same.families["r"].max_abs.mean()) == pytest.approx(same.eps, rel=1e-12)
    # a given eps is used as is; JSON and save / load
    fixed = A.direction_families(model, X, fams, eps=0.5)
    assert fixed.eps == 0.5 and fixed.eps_detail is None
    assert fixed.families["top"].count_max == int((res.families["top"].max_abs >= 0.5).sum())
    d = json.loads(json.dumps(res.to_dict()))
    assert d["families"]["top"]["fraction_mean"] == 1.0 and "| top |" in res.report()
    with pytest.raises(TypeError, match="hbk.boundary.direction_families: expected a non-empty"):
        A.direction_families(model, X, {})


def test_direction_families_save_load(tmp_path):
    model, X, y = trained()
    res = A.direction_families(model, X, A.family_vectors(M.compute_spectrum(model, (X, y)), 3))
    back = A.DirectionFamilies.load(res.save(tmp_path / "fam.json"))
    assert back.eps == res.eps and back.eps_detail.eps == res.eps
    assert torch.equal(back.families["bottom"].max_abs, res.families["bottom"].max_abs)
    assert back.families["random_directions"].eigenvalues is None
    assert back.report() == res.report()


# ----------------------------------------------------------------------------- coherence
def _dense_coherence(G, y, keep):
    """Block means by loops over the dense (n, p) gradients (the reference)."""
    classes = sorted(set(y.tolist()))
    C = len(classes)
    out = torch.full((C, C), float("nan"), dtype=torch.float64)
    for a, ca in enumerate(classes):
        for b, cb in enumerate(classes):
            vals = [float(G[i] @ G[j] / (G[i].norm() * G[j].norm()))
                    for i in range(len(y)) for j in range(len(y))
                    if y[i] == ca and y[j] == cb and i != j and keep[i] and keep[j]]
            if vals:
                out[a, b] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("labels", ["pred", "true"])
def test_gradient_coherence_matches_dense(labels):
    model, X, y = trained()
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(1))
    X, y = X[perm], y[perm]  # rows not already sorted by class
    coh = A.gradient_coherence(model, (X, y), labels=labels)
    G = ref_grads(model, X, pred(model, X) if labels == "pred" else y)
    gn = G.norm(dim=1)
    keep = gn > M.ROUNDOFF_FACTOR * torch.finfo(torch.float32).eps * gn.max()
    torch.testing.assert_close(coh.block_means, _dense_coherence(G, y, keep), rtol=1e-9,
                               atol=1e-12)
    order = torch.sort(y, stable=True).indices
    assert torch.equal(coh.order, order) and torch.equal(coh.sorted_labels, y[order])
    Gk = torch.where(keep[:, None], G, 0.0)[order]
    nk = Gk.norm(dim=1).clamp_min(1e-300)
    torch.testing.assert_close(coh.cosine, (Gk @ Gk.T) / (nk[:, None] * nk[None, :]),
                               rtol=1e-9, atol=1e-12)
    assert coh.counts == [int((keep & (y == c)).sum()) for c in range(3)]
    assert coh.gradient_labels == labels and coh.classes == [0, 1, 2]
    # a trained net: gradients of one class agree more than gradients of different classes
    assert coh.within_class > coh.between_class + 0.3


def test_coherence_from_gram_leaves_out_zero_and_roundoff_rows():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    G[2] = 0.0  # a zero gradient: no direction
    y = torch.tensor([1, 0, 1, 1, 0, 2, 0])
    keep = torch.ones(7, dtype=torch.bool)
    keep[4] = False  # a round-off gradient, as the mask would say
    coh = A.coherence_from_gram(G @ G.T, y, keep=keep)
    ok = keep & (G.norm(dim=1) > 0)
    torch.testing.assert_close(coh.block_means, _dense_coherence(G, y, ok), rtol=1e-12,
                               atol=1e-14, equal_nan=True)
    assert torch.isnan(coh.block_means[2, 2])  # one point of class 2: no pair
    assert coh.num_roundoff == 2 and coh.counts == [2, 2, 1]
    assert float(coh.cosine[coh.order.tolist().index(2)].abs().max()) == 0.0
    with pytest.raises(ValueError, match="hbk.boundary.coherence_from_gram: expected a \\(5, 5\\)"):
        A.coherence_from_gram(G @ G.T, y[:5])
    with pytest.raises(TypeError, match="expected integer class targets"):
        A.coherence_from_gram(G @ G.T, y.double())


# ----------------------------------------------------------------------------- analyze
def test_analyze_coherence_and_per_class_hessians_round_trip(tmp_path):
    model, X, y = trained()
    an = M.analyze(model, (X, y), per_class=True)
    # coherence: the same numbers as the stand-alone pass (the Gram of analyze's own pass)
    ref = A.gradient_coherence(model, (X, y))
    torch.testing.assert_close(an.coherence.block_means, ref.block_means, rtol=1e-9, atol=1e-12)
    assert an.coherence.cosine is None  # only the block means are kept
    # per-class Hessians against autograd: the mean loss over one class's points
    d = an.to_dict()
    for c in range(3):
        ev = torch.linalg.eigvalsh(ce_hessian(model, X[y == c], y[y == c])).flip(0)
        pc = d["per_class"][str(c)]
        assert pc["lambda_max"] == pytest.approx(float(ev[0]), rel=1e-8)
        assert pc["trace"] == pytest.approx(float(ev.sum()), rel=1e-8, abs=1e-14)
        assert pc["top_eigenvalues"] == pytest.approx(ev[:5].tolist(), rel=1e-7, abs=1e-12)
        assert pc["exact"] is True
    assert d["coherence"]["within_class"] == pytest.approx(ref.within_class)
    rep = an.report()
    assert "per-class Hessians" in rep and "class 2: lambda_max" in rep and "trace" in rep
    assert "gradient coherence" in rep
    json.dumps(M.to_jsonable(d))
    back = M.Analysis.load(an.save(tmp_path / "an.json"))
    assert torch.equal(back.coherence.block_means, an.coherence.block_means)
    assert back.to_dict()["per_class"] == d["per_class"]
    assert back.report() == rep


def test_analyze_coherence_option():
    model, X, y = trained()
    spec = M.compute_spectrum(model, (X, y))
    assert M.analyze(model, (X, y), spectrum=spec, coherence=False).coherence is None
    assert M.analyze(model, (X, y), spectrum=spec).to_dict()["per_class"] is None
    with pytest.raises(TypeError, match="hbk.boundary.analyze: expected coherence to be True"):
        M.analyze(model, (X, y), spectrum=spec, coherence="yes")


def test_analyze_coherence_default_off_for_many_points(monkeypatch):
    model, X, y = trained()
    spec = M.compute_spectrum(model, (X, y))
    monkeypatch.setattr(M, "COHERENCE_MAX_POINTS", 35)  # n = 36 > the limit
    assert M.analyze(model, (X, y), spectrum=spec).coherence is None
    assert M.analyze(model, (X, y), spectrum=spec, coherence=True).coherence is not None


# ----------------------------------------------------------------------------- figures
def test_plot_gradient_coherence_png_and_pdf(tmp_path):
    model, X, y = trained()
    coh = A.gradient_coherence(model, (X, y))
    path = P.plot_gradient_coherence({"normal": coh, "again": coh}, tmp_path / "coh.png",
                                     title="t")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 2000
    assert (tmp_path / "coh.pdf").stat().st_size > 1000
    with pytest.raises(ValueError, match="hbk.boundary.plot_gradient_coherence: expected at least"):
        P.plot_gradient_coherence({}, tmp_path / "x.png")
    small = M.analyze(model, (X, y)).coherence  # block means only
    with pytest.raises(ValueError, match="with its \\(n, n\\) cosines kept"):
        P.plot_gradient_coherence({"a": small}, tmp_path / "x.png")


def test_scalar_product_rows_with_own_colour_limits(tmp_path):
    model, X, y = trained()
    V = M.compute_spectrum(model, (X, y)).top(2)
    g = M.alignment_map(model, (-3, 3, -3, 3), V, resolution=10, normalize=False)
    assert P._row_vmax(P.MapRow("own", g, vmax=None)) == pytest.approx(float(g.maps.abs().max()))
    assert P._row_vmax(P.MapRow("fixed", g)) == 1.0
    rows = [P.MapRow("scalar [-1, 1]", g, cbar_label="<g, v>"),
            P.MapRow("scalar, own scale", g, vmax=None, cbar_label="<g, v>")]
    path = P.plot_alignment_maps(rows, tmp_path / "sp.png")
    assert path.stat().st_size > 2000 and (tmp_path / "sp.pdf").exists()
