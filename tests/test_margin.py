"""Margin estimation (hbkernels.boundary.margin) on toys with known answers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_measures import ref_alignment, trained

from hbkernels.boundary import margin as MG
from hbkernels.boundary import measures as M

pytestmark = pytest.mark.usefixtures("one_thread")

MARGIN = 0.3


def separable_toy():
    """Linearly separable, mirror-symmetric 2-D data; the closest points are (+-0.3, 0).

    A softmax regression trained from zero keeps the mirror symmetry, so its boundary is the
    line x = 0 (margin 0.3). With all |x| < 1 the top Hessian eigenvector is the bias
    direction (1, -1)/sqrt(2) on the biases, and the predicted-label gradient g(x) is
    proportional to (1, -1) (x) [x, 1]: its alignment with the top eigenvector is
    1/sqrt(|x|^2 + 1), so x_b = the origin (on the boundary) and the extreme training points are
    the two closest ones.
    """
    P = torch.tensor([[MARGIN, 0.0], [0.5, 0.4], [0.5, -0.4], [0.7, 0.1], [0.8, -0.2]],
                     dtype=torch.float64)
    X = torch.cat([P * torch.tensor([-1.0, 1.0], dtype=torch.float64), P])
    y = torch.tensor([0] * 5 + [1] * 5)
    model = torch.nn.Linear(2, 2).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def test_margin_on_separable_toy_with_known_margin():
    model, X, y = separable_toy()
    assert (model(X).argmax(-1) == y).all()
    s = M.compute_spectrum(model, (X, y))
    u = s.eigenvectors[:, 0]
    # parameters: weight (2x2) then bias (2): top eigenvector = (0, 0, 0, 0, -+1, +-1)/sqrt(2)
    assert abs(float(u[4:] @ torch.tensor([1.0, -1.0], dtype=torch.float64))) == pytest.approx(
        2**0.5, abs=1e-3)
    r = MG.estimate_margin(model, (X, y), u, restarts=4, steps=1000, lr=2.0, milestones=[900],
                           seed=0)
    assert r.x_b.norm() < 0.01  # the origin, on the boundary x = 0
    assert {tuple(r.x_max.tolist()), tuple(r.x_min.tolist())} == {(-MARGIN, 0.0), (MARGIN, 0.0)}
    assert r.margin == pytest.approx(MARGIN, abs=0.01)
    assert r.cos_max == pytest.approx(-r.cos_min, rel=1e-9)
    assert r.cos_max == pytest.approx(1 / (1 + MARGIN**2) ** 0.5, rel=1e-6)
    assert min(r.restart_objective) == r.restart_objective[r.chosen]
    d = json.loads(json.dumps(M.to_jsonable(r.to_dict())))
    assert d["margin"] == r.margin and len(d["restart_margin"]) == 4


def test_boundary_search_on_relu_net_is_batched_and_seeded():
    model, X, y = trained()
    s = M.compute_spectrum(model, (X, y))
    u = s.eigenvectors[:, 0]
    obj, cos = MG.boundary_objective(model, u)
    x = X[:3]
    torch.testing.assert_close(torch.stack([cos(xi) for xi in x]),
                               ref_alignment(model, x, u[:, None])[:, 0], rtol=1e-8, atol=1e-10)
    kw = dict(steps=60, lr=0.05, seed=3)
    xs, o, c = MG.find_boundary_points(model, u, (2,), restarts=3, **kw)
    x1, o1, _ = MG.find_boundary_points(model, u, (2,), restarts=1, **kw)
    torch.testing.assert_close(xs[:1], x1)  # batching does not couple the restarts
    torch.testing.assert_close(o[:1], o1)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (o <= torch.stack([obj(v) for v in x0]) + 1e-12).all()  # the search descends
    torch.testing.assert_close(o, (c**2 - 1) ** 2)
    again, _, _ = MG.find_boundary_points(model, u, (2,), restarts=3, **kw)
    torch.testing.assert_close(again, xs)
    with pytest.raises(ValueError, match="entries"):
        MG.find_boundary_points(model, u[:-1], (2,))


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_linear_fast_path_matches_vmap_objective(loss):
    from torch.func import grad, vmap

    model, X, y = trained()
    u = torch.randn(M.num_params(model), generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    objective, cos = MG.boundary_objective(model, u, loss)
    fast = MG._linear_cosine(model, u, loss)
    x = (X[:5] + 0.3).clone().requires_grad_(True)
    c = fast(x)
    torch.testing.assert_close(c, vmap(cos)(x.detach()), rtol=1e-9, atol=1e-12)
    (g,) = torch.autograd.grad(((c * c - 1) ** 2).sum(), x)
    torch.testing.assert_close(g, vmap(grad(objective))(x.detach()), rtol=1e-7, atol=1e-12)
    # a parameter outside the Linear layers: no fast path (the vmap path is used)
    model.extra = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    assert MG._linear_cosine(model, torch.cat([u, u[:1]]), loss) is None


def test_boundary_distance_ground_truth_margin():
    model, X, y = separable_toy()  # boundary x = 0, closest points (+-0.3, 0)
    bd = M.boundary_distance(model, X, (-1, 1, -1, 1), resolution=401)
    assert bd.margin == pytest.approx(MARGIN, abs=0.0026)  # half a grid step
    assert abs(float(X[bd.index, 0])) == MARGIN
    torch.testing.assert_close(bd.distances, X[:, 0].abs(), atol=0.0026, rtol=0)
    json.dumps(bd.to_dict())
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        M.boundary_distance(model, X[:, :1], (-1, 1, -1, 1))
