"""The closed-form conv chain (method "conv_chain") against torch.autograd.functional.hessian.

Small convolutional chains (odd, non-square images, stride 2, padding, max and average
pooling, ReLU/tanh/sigmoid, a ReLU before a MaxPool2d, ceil_mode) x losses {CE, MSE, BCE} x
reduction {mean, sum} x batches {one, several uneven} x dtype, with single vectors and blocks;
the Gauss-Newton product against JVP/VJP; the refusals; the auto rule and the paper's CNN and
LeNet-5 descriptions.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_close_scaled
from curvature_refs import flat_fn
from torch import nn

import hbkernels as hbk
from hbkernels.hvp import ConvChain, find_conv_chain

pytestmark = pytest.mark.usefixtures("one_thread")

N, C = 9, 3
SPLITS = [(0, 2), (2, 6), (6, 9)]
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def make_model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    if name == "stride_tanh":  # 11x9 -> s2 p1 -> 6x5 -> max 3x2 -> (2,1) kernel -> 2x2
        m = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, (2, 1)), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 5),
                          nn.Tanh(), nn.Linear(5, C))
    elif name == "avg_overlap":  # overlapping max windows, average pooling with padding
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(3, 2, 3, stride=2, bias=False),
                          nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(8, C))
    else:  # "lenet_like": ReLU before MaxPool2d (the fused mask), ceil_mode average pool
        m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2),
                          nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8, 6),
                          nn.ReLU(), nn.Linear(6, C))
    return m.double().eval()


MODELS = ["stride_tanh", "avg_overlap", "lenet_like"]


def inputs() -> torch.Tensor:
    return torch.randn(N, 2, 11, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def targets(loss: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if loss == "ce":
        return torch.randint(0, C, (N,), generator=g)
    if loss == "bce":
        return torch.randint(0, 2, (N, C), generator=g).double()
    return torch.randn(N, C, generator=g, dtype=torch.float64)


@functools.cache
def reference(model_name: str, loss: str, reduction: str) -> torch.Tensor:
    model, X, y = make_model(model_name), inputs(), targets(loss)
    loss_fn = LOSSES[loss](reduction=reduction)
    theta0, f = flat_fn(model, lambda call: loss_fn(call(X), y))
    return torch.autograd.functional.hessian(f, theta0)


def data_for(X, y, batches: str):
    return (X, y) if batches == "one" else [(X[a:b], y[a:b]) for a, b in SPLITS]


def _cast(model, X, y, dtype):
    if dtype == torch.float64:
        return model, X, y
    return model.float(), X.float(), (y.float() if y.is_floating_point() else y)


@pytest.mark.parametrize("batches", ["one", "several"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model_name", MODELS)
def test_conv_chain_matches_autograd_float64(model_name, loss, reduction, batches) -> None:
    H = reference(model_name, loss, reduction)
    model, X, y = make_model(model_name), inputs(), targets(loss)
    op = hbk.HessianOperator(model, LOSSES[loss](reduction=reduction), data_for(X, y, batches))
    assert op.method == "conv_chain" and op.dim == H.shape[0]
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close_scaled(op @ V, H @ V, rtol=1e-12)
    assert_close_scaled(op @ V[:, 1], H @ V[:, 1], rtol=1e-12)  # the single-vector path


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model_name", MODELS)
def test_conv_chain_float32(model_name, loss) -> None:
    H = reference(model_name, loss, "mean")
    model, X, y = _cast(make_model(model_name), inputs(), targets(loss), torch.float32)
    op = hbk.HessianOperator(model, LOSSES[loss](), data_for(X, y, "several"))
    assert op.method == "conv_chain" and op.dtype == torch.float32
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close_scaled((op @ V.float()).double(), H @ V, rtol=2e-4)
    assert_close_scaled((op @ V[:, 0].float()).double(), H @ V[:, 0], rtol=2e-4)


def test_columns_and_parameter_subset() -> None:
    """Identity column blocks through the chain, and params= over a subset."""
    H = reference("lenet_like", "ce", "mean")
    model, X, y = make_model("lenet_like"), inputs(), targets("ce")
    full = hbk.HessianOperator(model, "ce", data_for(X, y, "several"))
    assert_close_scaled(torch.cat([full.columns(j, min(j + 50, full.dim))
                                   for j in range(0, full.dim, 50)], 1), H, rtol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    keep = ["3.weight", "7.bias"]  # the second conv's weight and a Linear bias
    numels = {n: p.numel() for n, p in model.named_parameters()}
    offs = torch.cumsum(torch.tensor([0] + [numels[n] for n in names]), 0)
    idx = torch.cat([torch.arange(offs[names.index(n)], offs[names.index(n) + 1]) for n in keep])
    named = dict(model.named_parameters())
    op = hbk.HessianOperator(model, "ce", (X, y), params=[named[n] for n in keep])
    assert op.method == "conv_chain" and op.dim == idx.numel()
    E = torch.eye(op.dim, dtype=torch.float64)
    assert_close_scaled(op @ E, H[idx][:, idx], rtol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gauss_newton_matches_jvp_vjp(loss) -> None:
    model, X, y = make_model("stride_tanh"), inputs(), targets(loss)
    data = data_for(X, y, "several")
    op = hbk.GGNOperator(model, LOSSES[loss](), data)
    ref = hbk.GGNOperator(model, LOSSES[loss](), data, method="jvp_vjp")
    assert op.method == "conv_chain"
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_close_scaled(op @ V, ref @ V, rtol=1e-12)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad,msg", [
    (nn.Conv2d(2, 3, 3, dilation=2), "Conv2d at position 0 with dilation \\(2, 2\\)"),
    (nn.Conv2d(2, 2, 3, groups=2), "Conv2d at position 0 with groups=2"),
    (nn.Conv2d(2, 3, 3, padding="same"), "padding='same'"),
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_unsupported_conv_is_refused(bad, msg) -> None:
    model = nn.Sequential(bad, nn.ReLU(), nn.Flatten(), nn.LazyLinear(C)).double()
    X, y = inputs(), targets("ce")
    model(X)  # materialise the lazy Linear
    assert find_conv_chain(model) is None
    assert hbk.HessianOperator(model, "ce", (X, y)).method == "double_backward"
    with pytest.raises(ValueError, match="expected a convolutional chain for method='conv_chain'.*" + msg):
        hbk.HessianOperator(model, "ce", (X, y), method="conv_chain")
    with pytest.raises(ValueError, match="hbk.ConvChain: expected layers the closed-form chain supports"):
        ConvChain((bad, nn.ReLU()))


def test_batchnorm_and_other_layers_are_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 9 * 7, C)).double().eval()
    X, y = inputs(), targets("ce")
    assert hbk.HessianOperator(model, "ce", (X, y)).method == "double_backward"
    with pytest.raises(ValueError, match="got BatchNorm2d at position 1 \\(supported: Conv2d"):
        hbk.HessianOperator(model, "ce", (X, y), method="conv_chain")
    with pytest.raises(ValueError, match="expected a convolutional chain.*got a Net without a conv_chain"):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c = nn.Conv2d(2, 3, 3)

            def forward(self, x):
                return self.c(x).mean((2, 3))

        hbk.HessianOperator(Net().double(), "ce", (X, y), method="conv_chain")
    with pytest.raises(TypeError, match="hbk.ConvChain: expected layers to be a non-empty"):
        ConvChain(())
    # shapes the layers cannot take: a Linear on 4-D inputs
    seq = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(7, C)).double()
    with pytest.raises(ValueError, match="got Linear at position 1 on inputs of shape \\(3, 9, 7\\)"):
        hbk.HessianOperator(seq, "mse", (X, torch.randn(N, 3, 9, C, dtype=torch.float64)),
                            method="conv_chain")


# ----------------------------------------------------------------------------- descriptions
class DescribedCNN(nn.Module):
    def __init__(self, lie: bool = False) -> None:
        super().__init__()
        self.conv, self.fc, self.lie = nn.Conv2d(2, 3, 3), nn.Linear(3 * 4 * 3, C), lie

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))

    def conv_chain(self):
        act = nn.ReLU() if self.lie else nn.Tanh()
        return ConvChain((self.conv, act, nn.MaxPool2d(2), nn.Flatten(), self.fc))


def test_description_is_used_and_checked() -> None:
    X, y = inputs(), targets("ce")
    torch.manual_seed(0)
    model = DescribedCNN().double()
    op = hbk.HessianOperator(model, "ce", (X, y))
    ref = hbk.HessianOperator(model, "ce", (X, y), method="double_backward")
    assert op.method == "conv_chain"
    E = torch.eye(op.dim, dtype=torch.float64)[:, ::7]
    assert_close_scaled(op @ E, ref @ E, rtol=1e-12)
    with pytest.raises(ValueError, match="conv_chain\\(\\) description that computes the model's outputs"):
        hbk.HessianOperator(DescribedCNN(lie=True).double(), "ce", (X, y))


def test_paper_cnn_and_lenet5_describe_themselves() -> None:
    from hbkernels.boundary.models import CNN, LeNet5

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    for model, shape in ((CNN((1, 8, 8), 3), (1, 8, 8)), (LeNet5((3, 32, 32), 3), (3, 32, 32))):
        model = model.double()
        assert isinstance(model.conv_chain(), ConvChain)
        X = torch.rand(5, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)
        op = hbk.HessianOperator(model, "ce", (X, y))
        assert op.method == "conv_chain"
        ref = hbk.HessianOperator(model, "ce", (X, y), method="double_backward")
        V = torch.randn(op.dim, 2, generator=g, dtype=torch.float64)
        assert_close_scaled(op @ V, ref @ V, rtol=1e-12)
    assert CNN((1, 8, 8), 3, log_softmax=True).conv_chain() is None
    assert LeNet5((3, 32, 32), 3, log_softmax=True).conv_chain() is None


def test_custom_forward_falls_back() -> None:
    X, y = inputs(), targets("ce")
    op = hbk.HessianOperator(make_model("lenet_like"), "ce", (X, y),
                             forward=lambda m, b: (m(b[0]), b[1]))
    assert op.method == "double_backward"


@pytest.mark.parametrize("budget", [0, 40_000])
def test_float64_patch_cache_budget(monkeypatch, budget) -> None:
    """float64 runs the weight-direction terms as GEMMs on cached patches while they fit in
    UNFOLD_BYTES; without the cache (or with part of it) the convolutions give the same H."""
    import hbkernels.hvp.conv_chain_hvp as cch

    monkeypatch.setattr(cch, "UNFOLD_BYTES", budget)
    H = reference("stride_tanh", "ce", "mean")
    model, X, y = make_model("stride_tanh"), inputs(), targets("ce")
    op = hbk.HessianOperator(model, "ce", data_for(X, y, "several"))
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close_scaled(op @ V, H @ V, rtol=1e-12)
    cached = [c["st"][k][1] is not None for c in op.strategy._cache for k in (0, 3)]
    assert (not any(cached)) if budget == 0 else (any(cached) and not all(cached))


@pytest.mark.parametrize("name", ["lenet_like"])
def test_exact_hessian_auto_survives_a_zero_pattern_that_changes_between_batches(name):
    """The split assembly probes R's zero blocks on the first batch; when a later batch breaks
    that pattern, ``assembly='auto'`` assembles by columns (``'split'`` refuses)."""
    model, X, y = make_model(name), inputs(), targets("ce")
    data = data_for(X, y, "several")
    H = hbk.exact_hessian(model, "ce", data, chunk_size=50)
    ref = reference(name, "ce", "mean")
    assert float((H - ref).abs().max() / ref.abs().max()) < 1e-12
    from hbkernels.hvp.split import SplitPatternError

    with pytest.raises(SplitPatternError, match="on a later batch"):
        hbk.exact_hessian(model, "ce", data, chunk_size=50, assembly="split")
