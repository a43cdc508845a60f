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
from hbkernels.persample.capture import (
    RULES,
    ConvRule,
    EmbeddingRule,
    LinearRule,
    NormRule,
    find_layers,
)
from hbkernels.persample.engine import Engine
from hbkernels.persample.options import parse_options
from hbkernels.persample.planning import Work

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rules_cover_linear_and_convolutions():
    assert isinstance(RULES[nn.Linear], LinearRule)
    assert isinstance(RULES[nn.Conv1d], ConvRule) and isinstance(RULES[nn.Conv2d], ConvRule)
    assert isinstance(RULES[nn.Embedding], EmbeddingRule)
    for kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm):
        assert isinstance(RULES[kind], NormRule)


def _engine(model, X, **work):
    return Engine("t", model, X, parse_options("t", {}), Work(**work))


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, dilation=2, padding="same", groups=2, padding_mode="reflect"),
    lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2),
], ids=["conv2d-stride", "conv2d-groups-reflect", "conv1d-circular-groups"])
def test_conv_direct_gradients_equal_the_factor_product(conv):
    """The grouped-convolution backward gives sum_t d_t a_t^T of the unfolded patches."""
    torch.manual_seed(3)
    m = conv().double()
    x = torch.randn(3, 4, 7) if isinstance(m, nn.Conv1d) else torch.randn(3, 4, 7, 8)
    x = x.double()
    g = torch.randn_like(m(x))
    rule = RULES[type(m)]
    gw, gb = rule.direct(m, x, g)
    a, d = rule.factors(m, x, g)
    G = m.groups
    di, do = a.shape[2] // G, d.shape[2] // G
    ref = torch.cat([torch.bmm(d[..., i * do:(i + 1) * do].transpose(1, 2),
                               a[..., i * di:(i + 1) * di]).reshape(3, -1) for i in range(G)], 1)
    torch.testing.assert_close(gw, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, d.sum(1), rtol=1e-12, atol=1e-12)


def test_materialised_convolutions_are_direct_and_ghost_ones_factored():
    torch.manual_seed(4)
    model = lenet5().double()
    X = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    eng = _engine(model, X, norms=True, k=3, gram=True)
    assert [layer.direct for layer in eng.layers] == [True, True, False, False, False]
    assert {s.kind for s in eng.layout.segments} == {"p"}  # conv weights and biases
    eng = Engine("t", model, X, parse_options("t", {"strategy": "ghost"}), Work(norms=True))
    assert not any(layer.direct for layer in eng.layers)


def test_norm_layers_and_embeddings_need_no_fallback(dtype):
    """BatchNorm (eval) on (n, C) and (n, C, L), LayerNorm over two dims and without bias,
    GroupNorm, Embedding with padding_idx: all by rules, against vmap(grad)."""
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=2)
            self.bn1 = nn.BatchNorm1d(5)
            self.conv = nn.Conv1d(5, 6, 2)
            self.gn = nn.GroupNorm(3, 6)
            self.bn2 = nn.BatchNorm1d(6)
            self.ln = nn.LayerNorm((6, 3))
            self.ln2 = nn.LayerNorm(18, bias=False)
            self.head = nn.Linear(18, 3)

        def forward(self, ids):
            h = self.emb(ids)  # (n, 5, 4): 5 channels of length 4
            h = torch.tanh(self.gn(self.conv(self.bn1(h))))  # (n, 6, 3)
            h = self.ln(self.bn2(h)).flatten(1)
            return self.head(torch.tanh(self.ln2(h)))

    model = Net().to(dtype).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q))
    ids = torch.randint(0, 7, (6, 5))
    ids[0, 0] = 2  # a padding token
    eng = _engine(model, ids, norms=True)
    assert eng.fb == []
    check_all(model, ids, block_size=4, k=3)


def test_embedding_of_single_tokens_and_fallback_cases():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    ids = torch.randint(0, 6, (5,))
    assert _engine(model, ids, norms=True).fb == []
    check_all(model, ids, block_size=3, k=2)
    # max_norm renormalises the weight in the forward: the fallback handles it.
    model = nn.Sequential(nn.Embedding(6, 3, max_norm=1.0), nn.Tanh(), nn.Linear(3, 3)).double()
    assert _engine(model, ids, norms=True).fb == [0]


def test_direct_layers_with_frozen_bias_and_reuse(dtype):
    """A conv with a frozen bias (its gradient dropped) and one conv applied twice (summed)."""
    torch.manual_seed(10)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 2, 3, padding=1)
            self.c2 = nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(3 * 16, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.c2(torch.tanh(self.c1(torch.tanh(self.c1(x))))))
                             .flatten(1))

    model = Twice().to(dtype)
    model.c2.bias.requires_grad_(False)
    X = torch.randn(5, 2, 6, 6, dtype=dtype)
    check_all(model, X, block_size=3, k=3)
    eng = _engine(model, X, norms=True, k=2)
    assert eng.fb == [] and eng.layers[1].bias_dropped


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
    assert [layer.name for layer in layers if layer.param is None] == ["0", "3"]
    # The rest are bare-parameter candidates (the probe sees F.linear and sends them back).
    assert [layer.name for layer in layers if layer.param is not None] == [
        "1.bias", "2.weight", "2.bias"]
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
