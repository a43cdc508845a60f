"""Measures of hbkernels.boundary.measures against ground truth.

Ground truth: per-sample gradients from torch.func vmap(grad), Hessians from
torch.autograd.functional.hessian, eigenpairs from torch.linalg.eigh.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from curvature_refs import ce_hessian as ref_hessian  # the shared autograd ground truth

from hbkernels.boundary import measures as M


# ----------------------------------------------------------------------------- references
def ref_per_sample_grads(model: nn.Module, X: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, p) per-sample CE gradients with the given labels, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(prm, x, t):
        return F.cross_entropy(functional_call(model, prm, (x[None],)), t[None])

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, X, labels)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], dim=1)


def ref_alignment(model, X, V, labels=None) -> torch.Tensor:
    """Signed cosine of predicted-label gradients with the columns of V (zero grads give 0)."""
    if labels is None:
        with torch.no_grad():
            labels = model(X).argmax(-1)
    G = ref_per_sample_grads(model, X, labels)
    gn = G.norm(dim=1, keepdim=True)
    out = (G @ V) / (gn * V.norm(dim=0, keepdim=True))
    return torch.where(gn > 0, out, torch.zeros_like(out))


def ref_spectrum(model, X, y):
    ev, V = torch.linalg.eigh(ref_hessian(model, X, y))
    return ev.flip(0), V.flip(1)


# ----------------------------------------------------------------------------- fixtures
def make_blobs(n_per=12, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    means = torch.tensor([[2.0, -1.0], [-2.0, 0.0], [0.0, 2.0]])
    X = torch.cat([means[c] + 0.6 * torch.randn(n_per, 2, generator=gen) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n_per)
    return X.to(dtype), y


def fnn2(width=7, seed=0, dtype=torch.float32, classes=3, d_in=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes)).to(dtype)


@functools.lru_cache(maxsize=None)
def _trained(dtype, steps, width, seed):
    X, y = make_blobs(dtype=dtype)
    model = fnn2(width, seed, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def trained(dtype=torch.float64, steps=200, width=7, seed=0):
    """A small 3-class FNN_2layer-like model trained on blobs (cached; copies returned)."""
    model, X, y = _trained(dtype, steps, width, seed)
    return copy.deepcopy(model), X.clone(), y.clone()


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- pure measures
def test_make_grid_row_major():
    xs, ys, pts = M.make_grid((-1, 1, -2, 2), (5, 3))
    assert xs.shape == (5,) and ys.shape == (3,) and pts.shape == (15, 2)
    img = pts.reshape(3, 5, 2)
    torch.testing.assert_close(img[1, :, 0], xs)
    torch.testing.assert_close(img[:, 2, 1], ys)
    with pytest.raises(ValueError, match="expected extent"):
        M.make_grid((1, -1, 0, 1))


def test_plane_grid_hits_the_three_inputs():
    x0, x1, x2 = torch.randn(3, 1, 4, 4, dtype=torch.float64).unbind(0)
    a, b, pts = M.plane_grid(x0, x1, x2, resolution=5, span=(0.0, 1.0))
    grid = pts.reshape(5, 5, 1, 4, 4)
    torch.testing.assert_close(grid[0, 0], x0)
    torch.testing.assert_close(grid[0, -1], x1)
    torch.testing.assert_close(grid[-1, 0], x2)


def test_random_directions_unit_seeded():
    r = M.random_directions(101, 5, seed=3)
    torch.testing.assert_close(r.norm(dim=0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(r, M.random_directions(101, 5, seed=3))
    assert not torch.allclose(r, M.random_directions(101, 5, seed=4))
    assert M.random_directions(7, 2, dtype=torch.float32).dtype == torch.float32


def test_threshold_and_G_on_constructed_alignments():
    # 4 training points x 5 eigenvectors, known max |A| and mean |A| per column
    # (eps and column 3 are binary-exact so that the >= / > edge is tested exactly)
    A = torch.tensor([[0.90, -0.02, 0.00, 0.0625, 0.010],
                      [-0.10, 0.01, 0.00, -0.0625, 0.010],
                      [0.20, 0.00, 0.00, 0.0625, -0.010],
                      [0.00, 0.03, 0.00, 0.0625, 0.011]], dtype=torch.float64)
    eps = 0.0625
    g = M.generalization_measure(A, eps, rule="max")
    # max|A| = .9, .03, 0, .0625, .011 -> >= eps: columns 0 and 3 (equality counts)
    assert (g.count, g.total, g.value, g.lower_bound) == (2, 5, 0.4, False)
    gm = M.generalization_measure(A, eps, rule="mean")
    # mean|A| = .3, .015, 0, .0625, .01025 -> > eps strictly: column 0 only
    assert (gm.count, gm.value) == (1, 0.2)
    lb = M.generalization_measure(A, eps, rule="max", num_params=100)
    assert lb.lower_bound and lb.value == pytest.approx(0.02) and lb.num_vectors == 5
    rand = torch.tensor([[0.01, -0.04], [0.03, 0.02], [-0.02, 0.00]])
    per = M.threshold_from_alignments(rand)
    torch.testing.assert_close(per, torch.tensor([0.03, 0.04]))
    json.dumps(M.to_jsonable(g.to_dict()))
    with pytest.raises(ValueError, match="rule"):
        M.generalization_measure(A, eps, rule="median")
    with pytest.raises(ValueError, match="num_params"):
        M.generalization_measure(A, eps, num_params=3)
    with pytest.raises(ValueError, match="eps"):
        M.generalization_measure(A, float("nan"))


def test_count_outliers_gap_rule():
    gen = torch.Generator().manual_seed(0)
    bulk = (torch.rand(1000, generator=gen, dtype=torch.float64) - 0.5) * 0.02
    ev = torch.cat([bulk, torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)])
    o = M.count_outliers(ev[torch.randperm(ev.numel(), generator=gen)])
    assert o.count == 3 and o.outlier_values == [3.0, 2.0, 1.0]
    assert o.bulk_edge == pytest.approx(float(bulk.max()))
    assert M.count_outliers(ev * 1e-4).count == 3  # scale invariant
    assert M.count_outliers(bulk).count == 0  # a dense bulk has no outlier
    # a negative outlier is not a top outlier; two close outliers count as two
    assert M.count_outliers(torch.cat([bulk, torch.tensor([-5.0, 1.0, 1.01])])).count == 2
    assert M.count_outliers(torch.zeros(10)).count == 0
    # the paper's gauss normal top values (reference_setup 6): two outliers
    ref = torch.tensor([0.0925, 0.0283, 0.0088, 0.0058, 0.0047, 0.0023, -0.0014]
                       + [0.0] * 500, dtype=torch.float64)
    assert M.count_outliers(ref).count == 2
    with pytest.raises(ValueError):
        M.count_outliers(torch.tensor([float("nan")]))


def test_boundary_mask_marks_class_change():
    pred = torch.zeros(10, 12, dtype=torch.long)
    pred[:, 6:] = 1
    mask = M.boundary_mask(pred)
    assert mask[:, 5:7].all() and not mask[:, :4].any() and not mask[:, 8:].any()
    assert not M.boundary_mask(torch.zeros(4, 4)).any()


# ----------------------------------------------------------------------------- model measures
@pytest.mark.parametrize("n", [1, 13])
def test_gradient_alignment_matches_vmap(dtype, n):
    model = fnn2(5, seed=1, dtype=dtype)
    X = torch.randn(n, 2, dtype=dtype)
    V = torch.randn(M.num_params(model), 4, dtype=dtype)
    got = M.gradient_alignment(model, X, V, batch_size=5)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, ref_alignment(model, X, V), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="expected vectors of shape"):
        M.gradient_alignment(model, X, V[:-1])


def test_threshold_matches_reference():
    model, X, y = trained()
    t = M.random_direction_threshold(model, X, num_directions=5, seed=42)
    R = M.random_directions(M.num_params(model), 5, seed=42)
    expect = ref_alignment(model, X, R).abs().amax(0)
    assert t.eps == pytest.approx(float(expect.mean()), rel=1e-9)
    assert t.per_direction == pytest.approx(expect.tolist(), rel=1e-9)
    assert 0 < t.eps < 1
    json.dumps(t.to_dict())


def test_spectrum_exact_matches_eigh(dtype):
    model, X, y = trained(dtype=dtype)
    s = M.compute_spectrum(model, (X, y), dtype=torch.float64)
    m64 = M.as_dtype_model(model, torch.float64)
    ev, V = ref_spectrum(m64, X.double(), y)
    assert s.exact and s.num_params == M.num_params(model) and s.eigenvectors.shape == V.shape
    torch.testing.assert_close(s.eigenvalues, ev, rtol=1e-8, atol=1e-10 * float(ev.abs().max()))
    assert s.trace == pytest.approx(float(ev.sum()), rel=1e-8, abs=1e-12)
    # top eigenvector up to sign
    assert abs(float(s.eigenvectors[:, 0] @ V[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_analyze_matches_manual_G():
    model, X, y = trained()
    res = M.analyze(model, (X, y), num_directions=5, eps_seed=42, keep=10)
    ev, V = ref_spectrum(model, X, y)
    A = ref_alignment(model, X, V)
    eps = res.eps.eps
    assert res.exact and not res.G_lower_bound and not res.collapsed
    assert res.G_max.count == int((A.abs().amax(0) >= eps).sum())
    assert res.G_mean.count == int((A.abs().mean(0) > eps).sum())
    assert res.G == res.G_max.value and res.G_rule == "max"
    assert 0 < res.G_mean.value <= res.G_max.value < 1
    assert res.trace == pytest.approx(float(torch.diagonal(ref_hessian(model, X, y)).sum()), rel=1e-8)
    assert res.lambda_max == pytest.approx(float(ev[0]), rel=1e-8)
    assert res.param_norm == pytest.approx(float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()))
    assert res.alignments.shape == (X.shape[0], 10)
    d = json.loads(json.dumps(M.to_jsonable(res.to_dict())))
    assert d["G"] == res.G and d["num_outliers"] == res.outliers.count
    mean_rule = M.analyze(model, (X, y), rule="mean", spectrum=res.spectrum)
    assert mean_rule.G == res.G_mean.value and mean_rule.G_rule == "mean"


def test_analyze_reports_collapsed_hessian():
    model, X, y = trained()
    # a trace threshold above the model's trace: reported as collapsed, no G
    res = M.analyze(model, (X, y), min_trace=1e9)
    assert res.collapsed and res.G is None and "trace" in res.collapse_reason
    # a saturated model: every per-sample gradient underflows to zero, so eps = 0
    sat = M.as_dtype_model(model, torch.float64)
    with torch.no_grad():
        sat[-1].weight.mul_(1e5)
        sat[-1].bias.mul_(1e5)
    res0 = M.analyze(sat, (X, y))
    assert res0.collapsed and res0.G is None and res0.eps.eps == 0.0
    assert json.dumps(M.to_jsonable(res0.to_dict()))


def test_reparameterize_preserves_function_changes_curvature():
    model, X, y = trained()
    sharp = M.reparameterize(model, (0.2, 5.0, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(sharp(X), model(X), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sharp[0].weight, 0.2 * model[0].weight)
    torch.testing.assert_close(sharp[2].bias, model[2].bias)  # a1 * a2 = 1
    rep = M.reparameterization_report(model, (X, y))
    d = rep.to_dict()
    assert d["predictions_equal"] and d["max_abs_output_diff"] < 1e-10
    assert abs(d["lambda_max_ratio"] - 1.0) > 0.1  # the sharpness changes
    assert d["G_before"] is not None and d["G_after"] is not None
    json.dumps(M.to_jsonable(d))
    with pytest.raises(ValueError, match="product 1"):
        M.reparameterize(model, (0.2, 5.0, 2.0))
    with pytest.raises(ValueError, match="3 nn.Linear"):
        M.reparameterize(nn.Sequential(nn.Linear(2, 2)), (1, 1, 1))


def test_class_spectra_match_subset_hessian():
    model, X, y = trained()
    cs = M.class_spectra(model, (X, y), classes=[0, [1, 2]], k=3)
    assert set(cs) == {"0", "1+2"}
    sel = y >= 1
    ev, _ = ref_spectrum(model, X[sel], y[sel])
    torch.testing.assert_close(cs["1+2"].eigenvalues[:3], ev[:3], rtol=1e-8, atol=1e-12)
    assert cs["0"].eigenvectors.shape == (M.num_params(model), 3)


def test_covariance_overlaps_match_reference():
    model, X, y = trained()
    ev, V = ref_spectrum(model, X, y)
    ov = M.covariance_overlaps(model, (X, y), V[:, :4], ev[:4])
    G = ref_per_sample_grads(model, X, y)
    cev, CV = torch.linalg.eigh(G.T @ G / X.shape[0])
    CV = CV.flip(1)[:, :4]
    torch.testing.assert_close(ov.covariance_eigenvalues.double(), cev.flip(0)[:4], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ov.betas, (V[:, :4] * CV).sum(0).abs(), rtol=1e-5, atol=1e-6)
    assert ov.matrix.shape == (4, 4) and (ov.subspace <= 1 + 1e-9).all()
    json.dumps(M.to_jsonable(ov.to_dict()))


def test_grid_alignment_and_peak_report():
    model, X, y = trained()
    s = M.compute_spectrum(model, (X, y))
    grid = M.grid_alignment(model, s.top(3), (-4, 4, -4, 4), resolution=21)
    assert grid.maps.shape == (3, 21, 21) and grid.pred.shape == (21, 21)
    _, _, pts = M.make_grid((-4, 4, -4, 4), 21, dtype=torch.float64)
    torch.testing.assert_close(grid.maps[:, 4, 7], ref_alignment(model, pts[4 * 21 + 7][None], s.top(3))[0])
    rep = M.boundary_peak_report(grid)
    assert len(rep["per_vector"]) == 3 and 0 < rep["boundary_fraction"] < 1
    json.dumps(M.to_jsonable(rep))


def test_lanczos_path_labels_G_as_lower_bound():
    model, X, y = trained()
    ev, V = ref_spectrum(model, X, y)
    res = M.analyze(model, (X, y), max_exact_params=10, k=8)
    assert not res.exact and res.G_lower_bound and res.G_max.lower_bound
    assert res.G_max.num_vectors == 8 and res.G_max.total == M.num_params(model)
    torch.testing.assert_close(res.spectrum.eigenvalues[:3], ev[:3], rtol=1e-5, atol=1e-9)
    assert res.trace == pytest.approx(float(ev.sum()), rel=0.05)
    exact = M.analyze(model, (X, y))
    assert res.G_max.count <= exact.G_max.count  # a lower bound
    assert res.to_dict()["G_lower_bound"] is True


def test_plane_alignment_through_three_inputs():
    model, X, y = trained()
    V = M.random_directions(M.num_params(model), 2, seed=0)
    g = M.plane_alignment(model, [X[0], X[15], X[30]], V, resolution=5, span=(0.0, 1.0))
    assert g.maps.shape == (2, 5, 5) and g.pred.shape == (5, 5)
    expect = ref_alignment(model, X[[0, 15, 30]], V)
    torch.testing.assert_close(torch.stack([g.maps[:, 0, 0], g.maps[:, 0, -1], g.maps[:, -1, 0]]),
                               expect, rtol=1e-8, atol=1e-10)
    assert g.pred[0, 0] == model(X[:1]).argmax()
    with pytest.raises(ValueError, match="three anchors"):
        M.plane_alignment(model, [X[0], X[1]], V)
