"""exact_hessian's split assembly (``H = J^T D J + R`` on a cover of R's nonzero blocks)
against torch.autograd.functional.hessian of the total loss: small CNNs with max and average
pooling and stride, CE/MSE/BCE, mean/sum, one or several uneven batches, float32/float64,
tiny memory budgets, and the cases where the split must not be used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn
from torch.func import functional_call

import hbkernels as hbk
from hbkernels.hessian import HessianOperator
from hbkernels.hvp.split import split_plan

pytestmark = pytest.mark.usefixtures("one_thread")

C = 3


class TwoConv(nn.Module):
    """Conv(1, 3, 3, pad 1) ReLU MaxPool2, Conv(3, 4, 3, stride 2) ReLU AvgPool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        x = F.avg_pool2d(torch.relu(self.c2(x)), 1)
        return self.fc(x.flatten(1))


class BatchMix(nn.Module):
    """Outputs that mix samples (minus the batch mean): per-sample Jacobians do not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return h - h.mean(0, keepdim=True)


def _data(n: int = 13, loss: str = "ce", dtype=torch.float64, shape=(1, 9, 9)):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, *shape, generator=g, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, C, (n,), generator=g)
    elif loss == "bce":
        y = torch.randint(0, 2, (n, C), generator=g).to(dtype)
    else:
        y = torch.randn(n, C, generator=g, dtype=dtype)
    return X, y


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def _reference(model: nn.Module, loss_fn, X, y) -> torch.Tensor:
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    Xd = X.double()
    yd = y.double() if y.is_floating_point() else y

    def f(th):
        parts = torch.split(th, [s.numel() for s in shapes])
        ps = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, ps, (Xd,)), yd)

    return torch.autograd.functional.hessian(f, theta)


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return TwoConv().to(dtype).eval()


def _cells():
    for loss in LOSSES:
        for reduction in ("mean", "sum"):
            yield loss, reduction, "several", torch.float64
    yield "ce", "mean", "one", torch.float64
    yield "ce", "mean", "one", torch.float32
    yield "mse", "sum", "several", torch.float32


@pytest.mark.parametrize("loss,reduction,batches,dtype", list(_cells()),
                         ids=["-".join(map(str, c[:3])) + f"-{str(c[3])[-7:]}" for c in _cells()])
def test_split_matches_autograd(loss, reduction, batches, dtype) -> None:
    X, y = _data(loss=loss, dtype=dtype)
    model = _model(dtype)
    H = _reference(_model(), LOSSES[loss](reduction=reduction), X, y)
    data = (X, y) if batches == "one" else [(X[:2], y[:2]), (X[2:9], y[2:9]), (X[9:], y[9:])]
    Hx = hbk.exact_hessian(model, LOSSES[loss](reduction=reduction), data, assembly="split",
                           chunk_size=5)
    assert Hx.dtype == dtype and torch.equal(Hx, Hx.T)
    assert_close_scaled(Hx.double(), H, rtol=2e-5 if dtype == torch.float32 else 1e-11)


def test_split_is_the_auto_route_and_saves_columns() -> None:
    X, y = _data()
    model = _model()
    op = HessianOperator(model, "cross_entropy", (X, y))
    plan = split_plan(op.objective)
    assert plan.reason is None
    names = op.objective.names
    # ReLU + pooling: R's diagonal blocks and the last bias's row vanish; the big middle conv
    # is outside the cover (its rows come from the cover's columns)
    assert [names[t] for t in plan.cover] == ["c1.weight", "c1.bias", "fc.weight"]
    assert plan.columns == 27 + 3 + 48 < op.dim // 2
    H = _reference(_model(), F.cross_entropy, X, y)
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y)), H, rtol=1e-11)
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="columns"), H,
                        rtol=1e-11)


def test_tiny_budget_more_chunks_same_hessian() -> None:
    X, y = _data()
    model = _model()
    H = hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split")
    p = H.shape[0]
    # room for the matrix, twice the Jacobian and little else: one residual column and a few
    # samples per vmap call
    budget = p * p * 8 + 2 * 13 * C * p * 8 + 2048
    Ht = hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split", memory_budget=budget,
                           quiet=False)
    assert_close_scaled(Ht, H, rtol=1e-12)
    with pytest.raises(ValueError, match="hbk.exact_hessian: expected a model and data the split "
                       "assembly can take .* got a per-sample Jacobian"):
        hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split",
                          memory_budget=p * p * 8 + 1000)
    # auto falls back to identity columns within that budget
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y),
                                          memory_budget=p * p * 8 + 1000), H, rtol=1e-11)


def test_smooth_activations() -> None:
    """tanh: R's diagonal blocks of the layers before a tanh are dense and join the cover."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 7 * 7, C))
    model = model.double().eval()
    X, y = _data()
    op = HessianOperator(model, F.cross_entropy, (X, y))
    assert split_plan(op.objective).cover == [0, 1]  # the conv; the linear head's block is 0
    H = _reference(model, F.cross_entropy, X, y)
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split"), H,
                        rtol=1e-11)
    # two tanh convs and a small head: the cover is most of the columns, the split refused
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2, C)).double().eval()
    X, y = _data(shape=(1, 5, 5))
    op = HessianOperator(model, F.cross_entropy, (X, y))
    assert "residual cover" in split_plan(op.objective).reason
    H = _reference(model, F.cross_entropy, X, y)
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y)), H, rtol=1e-11)
    with pytest.raises(ValueError, match="expected a model and data the split assembly can take"):
        hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split")


def test_samples_that_mix_fall_back_to_columns() -> None:
    torch.manual_seed(0)
    model = BatchMix().double()
    X, y = _data(shape=(4,))
    op = HessianOperator(model, F.cross_entropy, (X, y))
    assert "mix samples" in split_plan(op.objective).reason
    H = _reference(model, F.cross_entropy, X, y)
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y)), H, rtol=1e-11)
    with pytest.raises(ValueError, match="got outputs that mix samples"):
        hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly="split")


def test_custom_forward_and_explicit_method_use_columns() -> None:
    X, y = _data()
    model = _model()
    H = _reference(_model(), F.cross_entropy, X, y)
    fwd = lambda m, b: (m(b[0]), b[1])
    assert_close_scaled(hbk.exact_hessian(model, F.cross_entropy, (X, y), forward=fwd), H,
                        rtol=1e-11)
    with pytest.raises(ValueError, match="custom forward"):
        hbk.exact_hessian(model, F.cross_entropy, (X, y), forward=fwd, assembly="split")
    Hf = hbk.exact_hessian(model, F.cross_entropy, (X, y), method="forward_over_reverse")
    assert_close_scaled(Hf, H, rtol=1e-11)


def test_assembly_is_checked() -> None:
    X, y = _data()
    with pytest.raises(ValueError, match="hbk.exact_hessian: expected assembly to be one of"):
        hbk.exact_hessian(_model(), F.cross_entropy, (X, y), assembly="fast")
