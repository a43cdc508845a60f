"""Factor capture (hbkernels/persample/capture.py): one rule per layer kind against vmap(grad)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from persample_refs import (
    Reuse,
    SeqModel,
    check_all,
    lenet5,
    mnist_cnn,
    pred,
    ref_cosine,
    ref_grads,
)
from torch import nn

import hbkernels as hbk
from hbkernels.params import trainable_parameters
from hbkernels.persample.capture import RULES, ConvRule, LinearRule, find_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rules_cover_linear_and_convolutions():
    assert isinstance(RULES[nn.Linear], LinearRule)
    assert isinstance(RULES[nn.Conv1d], ConvRule) and isinstance(RULES[nn.Conv2d], ConvRule)


@pytest.mark.parametrize("make, x_shape", [
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6)),
    (lambda: nn.Conv1d(2, 6, 3, dilation=2, padding="same", groups=2), (2, 2, 9)),
    (lambda: nn.Conv1d(2, 3, 2, padding=1, padding_mode="circular"), (2, 2, 5)),
    (lambda: nn.Linear(4, 3), (2, 5, 4)),
], ids=["conv2d", "conv1d-groups-same", "conv1d-circular", "linear-seq"])
def test_rule_factors_give_the_weight_gradient(make, x_shape):
    """sum_t d_t a_t^T and sum_t d_t equal autograd's weight and bias gradients."""
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    out = m(x)
    g = torch.randn_like(out)
    gw, gb = torch.autograd.grad(out, [m.weight, m.bias], g)
    a, d = RULES[type(m)].factors(m, x, g)
    groups = RULES[type(m)].groups(m)
    di, do = a.shape[-1] // groups, d.shape[-1] // groups
    parts = [torch.einsum("nto,nti->oi", d[..., k * do:(k + 1) * do], a[..., k * di:(k + 1) * di])
             for k in range(groups)]
    assert_close_scaled(torch.cat(parts).reshape(gw.shape), gw)
    assert_close_scaled(d.sum((0, 1)), gb)


def test_find_layers_skips_frozen_tied_and_subclassed():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), MyLinear(4, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    params = trainable_parameters(model)
    offsets = [0]
    for p in params[:-1]:
        offsets.append(offsets[-1] + p.numel())
    layers, pairs = find_layers(model, params, offsets)
    assert [layer.name for layer in layers] == ["0", "3"]
    k = next(i for i, p in enumerate(params) if p is model[3].weight)
    assert [q.w_offset for q in pairs] == [0, offsets[k]]


def test_mnist_cnn_casts_raw_pixels():
    """A model that casts uint8 inputs itself: inputs are passed unchanged."""

    class Cast(nn.Module):
        def forward(self, x):
            return x.double() / 255

    torch.manual_seed(5)
    model = nn.Sequential(Cast(), *mnist_cnn()).double()
    X = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    G = ref_grads(model, X, pred(model, X))
    assert_close_scaled(hbk.per_sample_grads(model, X), G)
    V = torch.randn(G.shape[1], 3, dtype=torch.float64)
    assert_close_scaled(hbk.gradient_alignment(model, X, V), ref_cosine(G, V))


def test_lenet5_matches_vmap():
    torch.manual_seed(6)
    model = lenet5(C=3).double()
    assert hbk.num_params(model) == 61411
    X = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_all(model, X, k=2)


@pytest.mark.parametrize(
    "conv",
    [
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2, "bias": False},
        {"groups": 2, "stride": (1, 2)},
        {"groups": 4, "bias": False, "padding": "same"},
        {"padding": "same", "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular", "groups": 2},
        {"padding": "valid", "kernel_size": (2, 3)},
    ],
    ids=["stride-pad", "dilation-nobias", "groups", "groups-same-nobias", "same-reflect",
         "circular-groups", "valid-rect"],
)
def test_conv_variants(conv, dtype):
    torch.manual_seed(7)
    conv = dict(conv)
    ks = conv.pop("kernel_size", 3)
    c = nn.Conv2d(4, 8, ks, **conv)
    with torch.no_grad():
        T = c(torch.zeros(1, 4, 9, 10)).numel()
    model = nn.Sequential(c, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(T, 3)).to(dtype)
    X = torch.randn(5, 4, 9, 10, dtype=dtype)
    check_all(model, X, block_size=2)


def test_conv1d_goes_through_factors(dtype):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 2, groups=2),
                          nn.Flatten(), nn.Linear(4 * 5, 3)).to(dtype)
    X = torch.randn(5, 2, 6, dtype=dtype)
    check_all(model, X, block_size=3)
    from hbkernels.persample.engine import Engine
    from hbkernels.persample.options import parse_options
    from hbkernels.persample.planning import Work

    eng = Engine("t", model, X, parse_options("t", {}), Work(norms=True))
    assert eng.fb == [] and [q.T for q in eng.pairs] == [6, 5, 5, 1]


def test_linear_on_sequences(dtype):
    torch.manual_seed(8)
    model = SeqModel().to(dtype)
    X = torch.randn(6, 5, 4, dtype=dtype)  # (n, T, d)
    check_all(model, X, block_size=4)


def test_reused_module_and_inplace_ops(dtype):
    torch.manual_seed(9)
    model = Reuse().to(dtype)
    X = torch.randn(5, 3, dtype=dtype)
    check_all(model, X, block_size=2)


def test_frozen_parameters_are_excluded(dtype):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3)).to(dtype)
    model[0].weight.requires_grad_(False)  # its bias falls back
    model[2].bias.requires_grad_(False)  # a ghost layer without a (trainable) bias
    X = torch.randn(6, 3, dtype=dtype)
    G = check_all(model, X, block_size=4)
    assert G.shape[1] == hbk.num_params(model) == 5 + 25 + 15 + 3
