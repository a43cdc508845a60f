"""HessianOperator, GGNOperator, eigenpairs and exact matrices against torch.autograd ground
truth; the data forms, the loss reductions and the determinism refusals end to end.
(The per-method matrix is tests/test_hvp.py; trace and density tests/test_estimators.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
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


# ----------------------------------------------------------------------------- validation
def test_validation_errors() -> None:
    model = mlp()
    X, y = cls_data(5)
    with pytest.raises(TypeError, match="hbk.HessianOperator: expected model to be a torch.nn.Module"):
        hbk.HessianOperator(lambda x: x, F.cross_entropy, (X, y))
    with pytest.raises(TypeError, match="hbk.HessianOperator: expected loss to be an nn.Module loss"):
        hbk.HessianOperator(model, 3, (X, y))
    with pytest.raises(ValueError, match="expected method to be one of"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), method="fast")
    with pytest.raises(TypeError, match="expected data to be"):
        hbk.HessianOperator(model, F.cross_entropy, 3)
    with pytest.raises(ValueError, match="outputs and targets of batch 0 with the same number of rows"):
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
    with pytest.raises(ValueError, match=r"hbk.HessianOperator.columns: expected j1 <= "):
        op.columns(0, op.dim + 1)
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
    assert hbk.HessianOperator(model, F.cross_entropy, (X, y)).method == "double_backward"
    with pytest.raises(ValueError, match="expected a Linear/activation chain for method='linear_chain'"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), method="linear_chain")
    seq = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()  # unsupported activation
    Xs, ys = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    op = hbk.HessianOperator(seq, F.cross_entropy, (Xs, ys))
    assert op.method == "double_backward"
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


# ----------------------------------------------------------------------------- reductions (bug a)
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse", "linear_chain"])
@pytest.mark.parametrize("loss_fn", [nn.MSELoss(reduction="sum"), nn.CrossEntropyLoss(reduction="sum"),
                                     "sum_callable"], ids=["mse_sum", "ce_sum", "callable_sum"])
def test_sum_reduction_over_several_batches(loss_fn, method) -> None:
    """Bug (a): a "sum" loss over uneven batches was weighted n_b / N like a mean (37-64 % off)."""
    model = mlp()
    X, y = cls_data(23)
    Y = torch.randn(23, 4, dtype=torch.float64)
    if loss_fn == "sum_callable":
        loss_fn = lambda o, t: F.cross_entropy(o, t, reduction="sum")
    target = Y if isinstance(loss_fn, nn.MSELoss) else y
    batches = [(X[:4], target[:4]), (X[4:15], target[4:15]), (X[15:], target[15:])]
    H = reference_hessian(model, loss_fn, [(X, target)])  # the whole sum: weight 1
    op = hbk.HessianOperator(model, loss_fn, batches, method=method)
    assert op.objective.loss.reduction == "sum"
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(hbk.exact_hessian(model, loss_fn, batches, method=method), H,
                               atol=1e-10, rtol=1e-9)


def test_callable_reduction_stated_or_refused() -> None:
    model = mlp()
    X, y = cls_data(12)
    op = hbk.HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="sum") / 3.0, (X, y),
                             reduction="sum")
    assert op.objective.loss.reduction == "sum"
    with pytest.raises(ValueError, match="pass reduction='mean' or reduction='sum'"):
        hbk.HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="sum") ** 0.5, (X, y))


# ----------------------------------------------------------------------------- determinism (bug b, c)
def test_active_dropout_is_refused() -> None:
    """Bug (b): active dropout made exact_hessian and hessian_eigs random (two calls differed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    X, y = cls_data(15)
    for call in (lambda: hbk.HessianOperator(model, F.cross_entropy, (X, y)),
                 lambda: hbk.exact_hessian(model, F.cross_entropy, (X, y)),
                 lambda: hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=2)):
        with pytest.raises(ValueError, match="active Dropout '2' .*call model.eval\\(\\)"):
            call()
    model.eval()
    H = reference_hessian(model, F.cross_entropy, [(X, y)])
    torch.testing.assert_close(hbk.exact_hessian(model, F.cross_entropy, (X, y)), H, atol=1e-12, rtol=1e-9)
    # opting out differentiates the random draws (no refusal)
    model.train()
    hbk.HessianOperator(model, F.cross_entropy, (X, y), check_deterministic=False)


def test_random_forward_is_refused() -> None:
    X, y = cls_data(15)
    model = mlp()

    def noisy(m, batch):
        x, t = batch
        return m(x + 0.1 * torch.randn_like(x)), t

    with pytest.raises(ValueError, match="expected a deterministic objective"):
        hbk.HessianOperator(model, F.cross_entropy, [(X, y)], forward=noisy)


def test_shuffling_loader_refused_and_loaders_streamed() -> None:
    """Bug (c): a shuffling or drop_last loader was materialised once, silently; two operators
    from the same loader then differed by 27 %. Now a shuffling loader is refused and every
    product streams the loader (drop_last: the Hessian of the samples it yields)."""
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    X, y = cls_data(23)
    ds = TensorDataset(X, y)
    with pytest.raises(ValueError, match="shuffle=False.*allow_shuffle=True"):
        hbk.HessianOperator(model, F.cross_entropy, DataLoader(ds, batch_size=5, shuffle=True))
    loader = DataLoader(ds, batch_size=5, drop_last=True)  # 20 of the 23 samples
    H = reference_hessian(model, F.cross_entropy, [(X[:20], y[:20])])
    ops = [hbk.HessianOperator(model, F.cross_entropy, loader, method=m)
           for m in ("double_backward", "forward_over_reverse", "auto")]
    assert not ops[0].objective.data.in_memory and ops[0].num_samples == 20
    V = torch.randn(ops[0].dim, 2, dtype=torch.float64)
    for op in ops:
        torch.testing.assert_close(op @ V, H @ V, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- data forms
def test_dict_batches_and_custom_forward() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(2, 5)
            self.out = nn.Linear(5, 4)

        def forward(self, x, extra):
            return self.out(torch.tanh(self.a(x) + self.b(extra)))

    torch.manual_seed(0)
    model = Net().double()
    X, y = cls_data(14)
    E = torch.randn(14, 2, dtype=torch.float64)
    named = dict(model.named_parameters())
    shapes, numels = [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return F.cross_entropy(functional_call(model, d, (X, E)), y)

    H = torch.autograd.functional.hessian(f, flatten_params(model))
    dicts = [{"x": X[:6], "extra": E[:6], "labels": y[:6]}, {"x": X[6:], "extra": E[6:], "labels": y[6:]}]
    tuples = [(X[:6], E[:6], y[:6]), (X[6:], E[6:], y[6:])]

    class Out:  # a HF-style output object
        def __init__(self, logits):
            self.logits = logits

    def forward(m, batch):
        return Out(m(batch["inp"][0], batch["inp"][1])).logits, batch["y"]

    custom = [{"inp": (X[:9], E[:9]), "y": y[:9]}, {"inp": (X[9:], E[9:]), "y": y[9:]}]
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for data, kw in ((dicts, {}), (tuples, {}), (custom, {"forward": forward})):
        for method in ("double_backward", "forward_over_reverse"):
            op = hbk.HessianOperator(model, "ce", data, method=method, **kw)
            torch.testing.assert_close(op @ V, H @ V, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="exactly one target key"):
        hbk.HessianOperator(model, "ce", [{"x": X, "extra": E}])


def test_mse_forward_over_reverse() -> None:
    """Bug (d): method="forward_over_reverse" failed with "ZeroTensors are immutable" on MSE."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, _ = cls_data(12)
    Y = torch.randn(12, 2, dtype=torch.float64)
    H = reference_hessian(model, F.mse_loss, [(X, Y)])
    for loss_fn in (F.mse_loss, nn.MSELoss(), lambda o, t: F.mse_loss(o, t)):
        op = hbk.HessianOperator(model, loss_fn, (X, Y), method="forward_over_reverse", reduction="mean")
        E = torch.eye(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op @ E, H, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- Gauss-Newton
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce", "nll"])
@pytest.mark.parametrize("model_name", ["mlp_relu", "mlp_tanh", "cnn", "seq", "bn_eval"])
def test_ggn_against_its_definition(model_name, loss, reduction) -> None:
    """G = J^T H_out J with J from torch.autograd.functional.jacobian, over uneven batches."""
    from curvature_refs import LOSSES, data_for, problem, reference_ggn

    G = reference_ggn(model_name, loss, reduction)
    model, X, y = problem(model_name, loss)
    methods = ["jvp_vjp"] + (["linear_chain"] if model_name.startswith("mlp") and loss != "nll" else [])
    for method in methods:
        op = hbk.GGNOperator(model, LOSSES[loss](reduction=reduction), data_for(X, y, "several"),
                             method=method)
        assert op.method == method
        Gx = hbk.exact_ggn(model, LOSSES[loss](reduction=reduction), data_for(X, y, "several"),
                           method=method)
        assert_close_scaled(Gx, G, rtol=1e-9)
        V = torch.randn(op.dim, 2, dtype=torch.float64)
        assert_close_scaled(op @ V, G @ V, rtol=1e-9)


def test_ggn_eigs_and_psd() -> None:
    from curvature_refs import problem, reference_ggn

    G = reference_ggn("mlp_tanh", "ce", "mean")
    model, X, y = problem("mlp_tanh", "ce")
    res = hbk.ggn_eigs(model, "ce", (X, y), k=3, tol=1e-10, seed=0)
    ev = torch.linalg.eigvalsh(G)
    assert ev.min() > -1e-12  # positive semi-definite for a convex loss
    torch.testing.assert_close(res.eigenvalues, ev.flip(0)[:3], atol=1e-9, rtol=1e-8)
    assert res.extra["operator"] == "GGNOperator" and res.extra["hvp_methods"]["block"] == "linear_chain"
    op = hbk.GGNOperator(model, "ce", (X, y), method="jvp_vjp")
    torch.testing.assert_close(hbk.eigs(op, 3, tol=1e-10, seed=0).eigenvalues, ev.flip(0)[:3],
                               atol=1e-9, rtol=1e-8)
    with pytest.raises(TypeError, match="hbk.eigs: expected a LinearOperator"):
        hbk.eigs(G, 3)


@pytest.mark.parametrize("method", ["linear_chain", "double_backward"])
def test_ignored_targets_with_a_sum_loss(method) -> None:
    """ignore_index rows have no curvature: the chain's closed form is declined for them."""
    model = mlp()
    X, y = cls_data(13)
    y[[0, 5]] = -100
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    H = reference_hessian(model, loss_fn, [(X, y)])  # weight 1 for one batch
    Hx = hbk.exact_hessian(model, loss_fn, [(X[:6], y[:6]), (X[6:], y[6:])], method=method)
    torch.testing.assert_close(Hx, H, atol=1e-12, rtol=1e-9)


def test_hessian_eigs_streamed_sum_loss() -> None:
    """Eigenpairs of a "sum" loss over a streamed DataLoader (uneven last batch)."""
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp()
    X, y = cls_data(23)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    H = reference_hessian(model, loss_fn, [(X, y)])
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    res = hbk.hessian_eigs(model, loss_fn, loader, k=3, tol=1e-10, seed=0, cache=False)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], atol=1e-8, rtol=1e-8)
    assert res.extra["num_samples"] == 23 and res.extra["hvp_methods"]["block"] == "linear_chain"
