"""Every HVP method against torch.autograd.functional.hessian of the total loss.

The matrix: models {MLP relu, MLP tanh, CNN with pooling, sequence model (Embedding +
LayerNorm + attention), BatchNorm in eval} x losses {CE, MSE, BCE-with-logits, NLL} x
reduction {mean, sum} x batches {one, several uneven} x dtype {float32, float64} x method
{double_backward, forward_over_reverse, linear_chain where it applies}. The reference is the
Hessian of the loss over all samples at once (reduction "mean": the mean over all samples;
"sum": the sum), in float64, so it does not depend on how the data is batched.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from curvature_refs import (
    CHAIN_MODELS,
    LOSSES,
    MODELS,
    C,
    data_for,
    make_inputs,
    make_model,
    make_targets,
    problem,
    reference,
)
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbkernels as hbk
from hbkernels.hvp import LinearChain, find_chain

pytestmark = pytest.mark.usefixtures("one_thread")



def cells():
    for model in MODELS:
        for loss in LOSSES:
            methods = ["double_backward", "forward_over_reverse"]
            if model in CHAIN_MODELS and loss != "nll":
                methods.append("linear_chain")
            for method in methods:
                yield model, loss, method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batches", ["one", "several"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_name,loss,method", list(cells()),
                         ids=["-".join(c) for c in cells()])
def test_hvp_matrix(model_name, loss, method, reduction, batches, dtype) -> None:
    H, value = reference(model_name, loss, reduction)
    model, X, y = problem(model_name, loss)
    if dtype == torch.float32:
        model = model.float()
        X = X.float() if X.is_floating_point() else X
        y = y.float() if y.is_floating_point() else y
    op = hbk.HessianOperator(model, LOSSES[loss](reduction=reduction), data_for(X, y, batches),
                             method=method)
    assert op.dim == H.shape[0] and op.dtype == dtype and op.method == method
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV = op @ V.to(dtype)
    assert HV.dtype == dtype and HV.shape == V.shape
    assert_close_scaled(HV.double(), H @ V, rtol=2e-4 if dtype == torch.float32 else 1e-9)
    assert_close_scaled((op @ V[:, 0].to(dtype)).double(), H @ V[:, 0],
                        rtol=2e-4 if dtype == torch.float32 else 1e-9)
    assert op.loss() == pytest.approx(value, rel=1e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_hessian_matrix(model_name, loss, reduction) -> None:
    """exact_hessian over several uneven batches, every model and loss (method auto)."""
    H, _ = reference(model_name, loss, reduction)
    model, X, y = problem(model_name, loss)
    Hx = hbk.exact_hessian(model, LOSSES[loss](reduction=reduction), data_for(X, y, "several"),
                           chunk_size=40)
    assert torch.equal(Hx, Hx.T)
    assert_close_scaled(Hx, H, rtol=1e-9)


# ----------------------------------------------------------------------------- the auto rule
def test_auto_picks_the_chain_only_when_the_model_is_one() -> None:
    X, y = make_inputs("mlp_relu"), make_targets("ce")
    assert hbk.HessianOperator(make_model("mlp_relu"), "ce", (X, y)).method == "linear_chain"
    assert hbk.HessianOperator(make_model("bn_eval"), "ce", (X, y)).method == "double_backward"
    # a chain with data it cannot take (a custom forward) falls back to reverse-over-reverse
    op = hbk.HessianOperator(make_model("mlp_relu"), "ce", (X, y), forward=lambda m, b: (m(b[0]), b[1]))
    assert op.method == "double_backward"
    with pytest.raises(ValueError, match="expected a Linear/activation chain for method='linear_chain'"):
        hbk.HessianOperator(make_model("cnn"), "ce", (make_inputs("cnn"), y), method="linear_chain")


def test_reverse_over_reverse_keeps_the_graph_only_for_one_in_memory_batch() -> None:
    X, y = make_inputs("cnn"), make_targets("ce")
    one = hbk.HessianOperator(make_model("cnn"), "ce", (X, y), method="double_backward")
    several = hbk.HessianOperator(make_model("cnn"), "ce", data_for(X, y, "several"),
                                  method="double_backward")
    v = torch.randn(one.dim, dtype=torch.float64)
    assert_close_scaled(one @ v, several @ v, rtol=1e-10)
    assert one.strategy._graph is not None and several.strategy._single is None
    one.release()
    assert one.strategy._graph is None


class DescribedMLP(nn.Module):
    """A module that describes itself as a chain (as the paper's MLPs do)."""

    def __init__(self, lie: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, C)
        self.lie = lie

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def linear_chain(self):
        return LinearChain((self.a, self.b), ("relu" if self.lie else "tanh",), flatten=True)


def test_linear_chain_description_is_used_and_checked() -> None:
    X, y = make_inputs("mlp_relu"), make_targets("ce")
    model = DescribedMLP().double()
    assert find_chain(model) is not None
    op = hbk.HessianOperator(model, "ce", (X, y))
    assert op.method == "linear_chain"
    ref = hbk.HessianOperator(model, "ce", (X, y), method="double_backward")
    E = torch.eye(op.dim, dtype=torch.float64)
    assert_close_scaled(op @ E, ref @ E, rtol=1e-10)
    with pytest.raises(ValueError, match="linear_chain\\(\\) description that computes the model's outputs"):
        hbk.HessianOperator(DescribedMLP(lie=True).double(), "ce", (X, y))
    with pytest.raises(ValueError, match="LinearChain: expected 1 activations"):
        LinearChain((model.a, model.b), ())


def test_boundary_mlp_provides_its_chain() -> None:
    from hbkernels.boundary.models import FNN2Layer

    torch.manual_seed(0)
    assert isinstance(FNN2Layer(2, (5, 4), 3).linear_chain(), LinearChain)
    assert FNN2Layer(2, (5, 4), 3, log_softmax=True).linear_chain() is None


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_transformer_encoder_layer_in_eval(method) -> None:
    """Bug (e): nn.TransformerEncoderLayer (d = 8, 2 heads) failed in every method with
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"; the math attention backend computes the same function twice differentiably."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, t):
            return self.fc(self.layer(self.emb(t)).mean(1))

    torch.manual_seed(0)
    model = Classifier().double().eval()
    tokens = torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    named = dict(model.named_parameters())
    shapes, numels = [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return nn.functional.cross_entropy(functional_call(model, d, (tokens,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(
            f, torch.cat([p.detach().reshape(-1) for p in named.values()]), vectorize=True)
    op = hbk.HessianOperator(model, "ce", (tokens, y), method=method)
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close_scaled(op @ V, H @ V, rtol=1e-9)
