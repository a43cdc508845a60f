"""Hessian operators against torch.autograd.functional.hessian; trace and density on known spectra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hbkernels as hbk
from hbkernels.params import flatten_params


pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- helpers
def reference_hessian(model: nn.Module, loss_fn, batches, names=None) -> torch.Tensor:
    """torch.autograd.functional.hessian of the size-weighted mean loss over the batches."""
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    total = sum(x.shape[0] for x, _ in batches)

    def f(theta):
        parts = torch.split(theta, numels)
        d = {**{n: p.detach() for n, p in named.items()},
             **{n: t.view(s) for n, t, s in zip(names, parts, shapes)}}
        return sum(loss_fn(functional_call(model, d, (x,)), y) * (x.shape[0] / total) for x, y in batches)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, theta0)


def mlp(seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def paper_fnn(width=100, classes=3, seed=0) -> nn.Module:
    """The paper's FNN_2layer: 2 -> width -> width -> classes, ReLU."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def gauss_data(n: int, dtype=torch.float32):
    """The paper's 3-class Gaussian mixture (RandomState(42), stds are scales)."""
    rs = np.random.RandomState(42)
    means = [(2, -1), (-2, 0), (0, 2)]
    stds = [(0.5, 0.5), (0.5, 1.0), (0.5, 0.5)]
    X, y = [], []
    for c in range(3):
        for _ in range(n // 3):
            X.append(rs.normal(means[c], stds[c]))
            y.append(c)
    return torch.tensor(np.array(X), dtype=dtype), torch.tensor(y)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))


def cls_data(n=21, d=3, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


# ----------------------------------------------------------------------------- HVPs
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse", "auto"])
@pytest.mark.parametrize("nbatches", [1, 3])
def test_hvp_matches_reference(method: str, nbatches: int) -> None:
    model = mlp()
    X, y = cls_data(23)
    batches = [(X, y)] if nbatches == 1 else [(X[:5], y[:5]), (X[5:16], y[5:16]), (X[16:], y[16:])]
    H = reference_hessian(model, F.cross_entropy, batches)
    op = hbk.HessianOperator(model, F.cross_entropy, batches[0] if nbatches == 1 else batches, method=method)
    assert op.dim == H.shape[0] == flatten_params(model).numel()
    g = torch.Generator().manual_seed(1)
    V = torch.randn(op.dim, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), H @ V, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], atol=1e-12, rtol=1e-10)
    assert op.num_matvecs >= 6
    assert set(op.methods_used) == {"single", "block"}
    want = sum(F.cross_entropy(model(x), t).item() * len(t) for x, t in batches) / 23
    assert op.loss() == pytest.approx(want, rel=1e-12)


def test_hvp_float32_model_and_float64_operator() -> None:
    model = mlp(dtype=torch.float32)
    X, y = cls_data(17, dtype=torch.float32)
    H64 = reference_hessian(mlp(dtype=torch.float64), F.cross_entropy, [(X.double(), y)])
    v = torch.randn(H64.shape[0], dtype=torch.float64)
    op32 = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    out32 = op32.matvec(v.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), H64 @ v, atol=1e-5, rtol=1e-4)
    op64 = hbk.HessianOperator(model, F.cross_entropy, (X, y), dtype=torch.float64)
    torch.testing.assert_close(op64.matvec(v), H64 @ v, atol=1e-12, rtol=1e-10)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_parameter_filter() -> None:
    model = mlp()
    X, y = cls_data(19)
    full = reference_hessian(model, F.cross_entropy, [(X, y)])
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    # one layer by name predicate, and the same by an iterable of parameters
    sel = [i for i, n in enumerate(names) if n.startswith("2.")]
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in sel])
    sub = full[idx][:, idx]
    for params in (lambda n: n.startswith("2."), [model[2].bias, model[2].weight]):
        op = hbk.HessianOperator(model, F.cross_entropy, (X, y), params=params)
        assert op.dim == idx.numel()
        E = torch.eye(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(E), sub, atol=1e-12, rtol=1e-10)
    H = hbk.exact_hessian(model, F.cross_entropy, (X, y), params=lambda n: n.startswith("2."))
    torch.testing.assert_close(H, sub, atol=1e-12, rtol=1e-10)


def test_to_scipy_eigsh() -> None:
    from scipy.sparse.linalg import eigsh

    model = mlp()
    X, y = cls_data(23)
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    lin = op.to_scipy()
    assert lin.shape == (op.dim, op.dim)
    x = np.random.RandomState(0).randn(op.dim)
    np.testing.assert_allclose(lin @ x, (H @ torch.from_numpy(x)).numpy(), atol=1e-12, rtol=1e-10)
    w = eigsh(lin, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(w)[::-1], torch.linalg.eigvalsh(H).flip(0)[:3].numpy(), rtol=1e-8)


# ----------------------------------------------------------------------------- eigenpairs
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_hessian_eigs_mlp(which: str) -> None:
    model = mlp()
    X, y = cls_data(29)
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    res = hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=4, which=which, tol=1e-9, seed=0)
    ev = torch.linalg.eigvalsh(H)
    want = {"LA": ev.flip(0), "SA": ev, "LM": ev[ev.abs().argsort(descending=True)]}[which][:4]
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-7, rtol=0)
    Y = res.eigenvectors
    assert Y.shape == (H.shape[0], 4)
    torch.testing.assert_close((H @ Y - Y * res.eigenvalues).norm(dim=0), res.residuals, atol=1e-9, rtol=1e-5)
    assert res.extra["dim"] == H.shape[0] and res.extra["num_samples"] == 29


def test_hessian_eigs_paper_fnn_subsample() -> None:
    """The paper's 2-100-100-3 FNN (p = 10,703) on 30 gaussian points: the Hessian of the
    output layer and the second hidden bias against autograd, and the full-model top-5
    against eigsh on an independent HVP (torch.autograd.functional.hvp)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = paper_fnn().double()
    X, y = gauss_data(30, torch.float64)
    assert sum(p.numel() for p in model.parameters()) == 10703
    names = ["2.bias", "4.weight", "4.bias"]
    sel = lambda n: n in names
    H = reference_hessian(model, F.cross_entropy, [(X, y)], names=names)
    Hx = hbk.exact_hessian(model, F.cross_entropy, (X, y), params=sel)
    torch.testing.assert_close(Hx, H, atol=1e-12, rtol=1e-9)
    res = hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=3, params=sel, tol=1e-9, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], atol=1e-8, rtol=1e-8)

    # full model: an independent operator for ground truth
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    numels = [p.numel() for p in named.values()]

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return F.cross_entropy(functional_call(model, d, (X,)), y)

    theta0 = flatten_params(model)

    def mv(x):
        return torch.autograd.functional.hvp(f, theta0, torch.from_numpy(x).reshape(-1))[1].numpy()

    w = np.sort(eigsh(LinearOperator((10703, 10703), matvec=mv, dtype=np.float64), k=5, tol=1e-10,
                      return_eigenvectors=False))[::-1]
    full = hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=5, tol=1e-8, seed=0)
    assert full.all_converged
    np.testing.assert_allclose(full.eigenvalues.numpy(), w, rtol=1e-7, atol=1e-9)


def test_small_cnn_exact_and_eigs() -> None:
    torch.manual_seed(0)
    model = SmallCNN().double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(11, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    for method in ("double_backward", "forward_over_reverse"):
        Hx = hbk.exact_hessian(model, F.cross_entropy, (X, y), method=method, chunk_size=16)
        torch.testing.assert_close(Hx, H, atol=1e-12, rtol=1e-9)
    res = hbk.hessian_eigs(model, F.cross_entropy, [(X[:4], y[:4]), (X[4:], y[4:])], k=3, tol=1e-9, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], atol=1e-8, rtol=0)


def test_mse_loss_and_batch_weights() -> None:
    model = mlp()
    X, _ = cls_data(14)
    Y = torch.randn(14, 4, dtype=torch.float64)
    batches = [(X[:3], Y[:3]), (X[3:], Y[3:])]  # unequal sizes: weights 3/14 and 11/14
    H = reference_hessian(model, F.mse_loss, batches)
    torch.testing.assert_close(hbk.exact_hessian(model, F.mse_loss, batches), H, atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------- exact / spectrum
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_hessian_and_spectrum(dtype) -> None:
    model = mlp(dtype=dtype)
    X, y = cls_data(31, dtype=dtype)
    H = reference_hessian(mlp(dtype=torch.float64), F.cross_entropy, [(X.double(), y)])
    Hx = hbk.exact_hessian(model, F.cross_entropy, (X, y), chunk_size=13, quiet=False)
    assert Hx.dtype == dtype and torch.equal(Hx, Hx.T)
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(Hx.double(), H, atol=atol, rtol=1e-5)
    ev, U = hbk.hessian_spectrum(model, F.cross_entropy, (X, y))
    assert ev.dtype == torch.float64 and (ev.diff() <= 0).all()
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(H).flip(0), atol=1e-6 if dtype == torch.float32 else 1e-12,
                               rtol=0)
    torch.testing.assert_close(U @ torch.diag(ev) @ U.T, H, atol=1e-5 if dtype == torch.float32 else 1e-11, rtol=0)


def test_exact_hessian_refuses_what_does_not_fit() -> None:
    model = mlp()
    X, y = cls_data(5)
    p = flatten_params(model).numel()
    with pytest.raises(ValueError, match=rf"hbk.exact_hessian: expected the {p} x {p} Hessian .* to fit"):
        hbk.exact_hessian(model, F.cross_entropy, (X, y), memory_budget=p * p * 8 - 1)


# ----------------------------------------------------------------------------- trace, density
def known_matrix(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=torch.float64),
                       0.1 * torch.randn(n - 4, generator=g, dtype=torch.float64)])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * evals) @ Q.T, evals


def test_trace_estimators() -> None:
    A, evals = known_matrix()
    tr = float(evals.sum())
    op = hbk.MatrixOperator(A)
    pp = hbk.hessian_trace(op, num_probes=30, seed=0)
    assert pp.num_matvecs == 30 and op.num_matvecs == 30
    # Hutch++ removes the 4 outliers exactly: its error is that of the small bulk
    assert abs(pp.estimate - tr) < 4 * pp.std_error + 1e-9 and abs(pp.estimate - tr) < 1.0
    hu = hbk.hessian_trace(A, num_probes=200, method="hutchinson", seed=0, block_size=64)
    assert abs(hu.estimate - tr) < 4 * hu.std_error
    # a sketch that spans everything makes Hutch++ exact
    exact = hbk.hessian_trace(op, num_probes=3 * 60, seed=1)
    assert exact.estimate == pytest.approx(tr, abs=1e-9)
    assert hbk.hessian_trace(op, num_probes=30, seed=0).estimate == pp.estimate  # seeded
    assert json.loads(json.dumps(pp.to_dict()))["method"] == "hutch++"


def test_trace_of_hessian_operator() -> None:
    model = mlp()
    X, y = cls_data(23)
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    res = hbk.hessian_trace(op, num_probes=3 * op.dim, seed=0, block_size=50)
    assert res.estimate == pytest.approx(float(H.trace()), rel=1e-9)


def test_spectral_density_known_spectrum() -> None:
    A, evals = known_matrix(n=40)
    # m = dim Lanczos steps: Gauss quadrature is exact, the nodes are the eigenvalues
    sigma = 0.5
    d = hbk.spectral_density(A, num_probes=200, lanczos_steps=40, sigma=sigma, seed=0, block_size=100)
    assert d.num_matvecs == 200 * 40
    torch.testing.assert_close(d.weights.sum(1), torch.ones(200, dtype=torch.float64), atol=1e-10, rtol=0)
    heavy = d.weights > 1e-8
    dist = (d.nodes[heavy][:, None] - evals[None]).abs().min(1).values
    assert dist.max() < 1e-8
    grid = d.grid
    true = torch.exp(-0.5 * ((grid[:, None] - evals[None]) / sigma) ** 2).sum(1) / (
        len(evals) * sigma * np.sqrt(2 * np.pi))
    dx = float(grid[1] - grid[0])
    assert float(d.density.sum() * dx) == pytest.approx(1.0, abs=1e-3)
    assert float((d.density - true).abs().sum() * dx) < 0.1  # L1 distance of two densities
    # the first moment is tr(A) / n
    mean = float((d.density * grid).sum() * dx)
    assert mean == pytest.approx(float(evals.mean()), abs=0.2)


def test_spectral_density_few_steps_and_hessian() -> None:
    model = mlp()
    X, y = cls_data(23)
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    d = hbk.spectral_density(op, num_probes=8, lanczos_steps=15, seed=0, grid=300, quiet=False)
    ev = torch.linalg.eigvalsh(H)
    # extreme Ritz values converge first: the outermost nodes are near the extreme eigenvalues
    assert abs(float(d.nodes.max()) - float(ev[-1])) < 1e-3 * float(ev.abs().max())
    assert d.grid.shape == (300,) and (d.density >= 0).all()
    assert json.loads(json.dumps(d.to_dict()))["sigma"] == d.sigma


# ----------------------------------------------------------------------------- validation
def test_validation_errors() -> None:
    model = mlp()
    X, y = cls_data(5)
    with pytest.raises(TypeError, match="hbk.HessianOperator: expected model to be a torch.nn.Module"):
        hbk.HessianOperator(lambda x: x, F.cross_entropy, (X, y))
    with pytest.raises(TypeError, match="expected loss_fn to be callable"):
        hbk.HessianOperator(model, 3, (X, y))
    with pytest.raises(ValueError, match="expected method to be one of"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), method="fast")
    with pytest.raises(TypeError, match="expected data to be"):
        hbk.HessianOperator(model, F.cross_entropy, 3)
    with pytest.raises(ValueError, match="same nonzero number of rows"):
        hbk.HessianOperator(model, F.cross_entropy, [(X, y[:3])])
    with pytest.raises(ValueError, match="expected params to be trainable parameters of model"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="select at least one"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), params=lambda n: False)
    with pytest.raises(TypeError, match="expected dtype float32 or float64"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), dtype=torch.int32)
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    with pytest.raises(ValueError, match=r"hbk.HessianOperator: expected shape \("):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="hbk.hessian_trace: expected an operator"):
        hbk.hessian_trace(object())
    with pytest.raises(ValueError, match="expected method 'hutch\\+\\+' or 'hutchinson'"):
        hbk.hessian_trace(op, method="exact")
    with pytest.raises(ValueError, match="expected lanczos_steps <= dim"):
        hbk.spectral_density(op, lanczos_steps=op.dim + 1)
    with pytest.raises(ValueError, match="hbk.MatrixOperator: expected a square matrix"):
        hbk.MatrixOperator(torch.ones(2, 3))


def test_matvec_errors_propagate_through_hessian_eigs() -> None:
    model = mlp()
    X, y = cls_data(5)

    def bad_loss(out, target):
        raise ArithmeticError("loss exploded")

    with pytest.raises(ArithmeticError, match="loss exploded"):
        hbk.hessian_eigs(model, bad_loss, (X, y), k=2, method="double_backward")


# ----------------------------------------------------------------------------- linear chains
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid])
def test_linear_chain_matches_reference(act) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 9), act(), nn.Linear(9, 5), act(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(19, 2, 3, generator=g, dtype=torch.float64)  # flattened by the model
    y = torch.randint(0, 3, (19,), generator=g)
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    H = reference_hessian(model, F.cross_entropy, batches)
    op = hbk.HessianOperator(model, F.cross_entropy, batches)
    assert op.methods_used == {"single": "linear_chain", "block": "linear_chain"}
    V = torch.randn(op.dim, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), H @ V, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.matvec(V[:, 1]), H @ V[:, 1], atol=1e-12, rtol=1e-10)
    # identity columns, full and lower-triangle-only, and the assembled matrix
    torch.testing.assert_close(op.columns(3, 70), H[:, 3:70], atol=1e-12, rtol=1e-10)
    low = op.columns(60, 95, lower=True)  # spans b1 and W2: the lower triangle is exact
    torch.testing.assert_close(torch.tril(low[60:]), torch.tril(H[60:, 60:95]), atol=1e-12, rtol=1e-10)
    Hx = hbk.exact_hessian(model, F.cross_entropy, batches, chunk_size=17)
    torch.testing.assert_close(Hx, H, atol=1e-12, rtol=1e-10)
    assert torch.equal(Hx, Hx.T)


def test_linear_chain_boundary_mlp_filter_and_float32() -> None:
    from hbkernels.boundary.models import FNN2Layer

    torch.manual_seed(0)
    model = FNN2Layer(2, (13, 11), 3)
    X, y = gauss_data(30)
    ref_model = FNN2Layer(2, (13, 11), 3).double()
    ref_model.load_state_dict(model.state_dict())
    H = reference_hessian(ref_model, F.cross_entropy, [(X.double(), y)])
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    assert op.methods_used["block"] == "linear_chain" and op.dtype == torch.float32
    Hx = hbk.exact_hessian(model, F.cross_entropy, (X, y))
    assert Hx.dtype == torch.float32
    torch.testing.assert_close(Hx.double(), H, atol=1e-6, rtol=1e-4)
    H64 = hbk.exact_hessian(model, F.cross_entropy, (X, y), dtype=torch.float64)
    torch.testing.assert_close(H64, H, atol=1e-12, rtol=1e-9)
    # one layer (fc2) by name; rows and columns of the full Hessian
    names = [n for n, _ in ref_model.named_parameters()]
    sizes = [p.numel() for p in ref_model.parameters()]
    off = np.cumsum([0] + sizes)
    sel = [i for i, n in enumerate(names) if n.startswith("fc2")]
    idx = torch.cat([torch.arange(off[i], off[i + 1]) for i in sel])
    Hs = hbk.exact_hessian(model, F.cross_entropy, (X, y), dtype=torch.float64, params=lambda n: n.startswith("fc2"))
    torch.testing.assert_close(Hs, H[idx][:, idx], atol=1e-12, rtol=1e-9)
    res = hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=3, hvp_dtype=torch.float64, tol=1e-10, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], atol=1e-9, rtol=1e-9)


def test_linear_chain_not_used_for_other_models() -> None:
    model = SmallCNN().double()
    X = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    assert hbk.HessianOperator(model, F.cross_entropy, (X, y)).methods_used == {}
    with pytest.raises(ValueError, match="expected a Linear/activation chain for method='linear_chain'"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), method="linear_chain")
    seq = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()  # unsupported activation
    Xs, ys = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    op = hbk.HessianOperator(seq, F.cross_entropy, (Xs, ys))
    assert op.methods_used == {}
    H = reference_hessian(seq, F.cross_entropy, [(Xs, ys)])
    torch.testing.assert_close(hbk.exact_hessian(seq, F.cross_entropy, (Xs, ys)), H, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_linear_chain_cross_entropy_modules(loss_fn) -> None:
    """The closed-form softmax Hessian (plain cross-entropy) and the autograd fallback."""
    model = mlp()
    X, y = cls_data(17)
    H = reference_hessian(model, loss_fn, [(X, y)])
    op = hbk.HessianOperator(model, loss_fn, (X, y))
    assert op.methods_used["block"] == "linear_chain"
    torch.testing.assert_close(op.columns(0, op.dim), H, atol=1e-12, rtol=1e-10)
