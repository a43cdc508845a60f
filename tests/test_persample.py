"""The per-sample gradient engine against torch.func vmap(grad) references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn
from torch.func import functional_call, grad, vmap

import hbkernels as hbk
from hbkernels.params import trainable_parameters

STRATEGIES = ["auto", "ghost", "materialise"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- reference
def ref_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss of a batch of one, as the paper's code computes it."""
    if loss == "ce":
        return F.cross_entropy(out, y)
    if loss == "nll":
        return F.nll_loss(out, y)
    onehot = (torch.arange(out.shape[1]) == y.unsqueeze(1)).to(out.dtype)  # vmap-able one_hot
    return F.mse_loss(out, onehot)


def ref_grads(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """(n, p) per-sample gradients of the trainable parameters by vmap(grad(functional_call))."""
    names = {id(p): nm for nm, p in model.named_parameters()}
    train = [names[id(p)] for p in trainable_parameters(model)]
    allp = {nm: p.detach() for nm, p in model.named_parameters()}
    theta = {nm: allp.pop(nm) for nm in train}

    def f(th, x, t):
        out = functional_call(model, {**allp, **th}, (x.unsqueeze(0),))
        return ref_loss(out, t.unsqueeze(0), loss)

    g = vmap(grad(f), in_dims=(None, 0, 0))(theta, X, y)
    return torch.cat([g[nm].reshape(X.shape[0], -1) for nm in train], 1)


def ref_cosine(G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    gn, vn = G.norm(dim=1, keepdim=True), V.norm(dim=0, keepdim=True)
    return torch.where((gn > 0) & (vn > 0), (G @ V) / (gn * vn).clamp_min(1e-300), 0.0)


def pred(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(X).argmax(1)


def check_all(model, X, *, labels="pred", loss="ce", targets=None, block_size=None,
              strategies=STRATEGIES, k=4, seed=0):
    """Every public function vs the reference, for each strategy."""
    if isinstance(labels, torch.Tensor):
        y = labels
    elif labels == "true":
        y = targets
    else:
        y = pred(model, X)
    G = ref_grads(model, X, y, loss)
    kw = dict(labels=labels, loss=loss, targets=targets, block_size=block_size)
    assert_close_scaled(hbk.per_sample_grads(model, X, **kw), G)
    gen = torch.Generator().manual_seed(seed)
    dtype = G.dtype
    V = torch.randn(G.shape[1], k, generator=gen, dtype=torch.float64).to(dtype)
    for s in strategies:
        assert_close_scaled(hbk.gradient_norms(model, X, strategy=s, **kw), G.norm(dim=1))
        assert_close_scaled(hbk.gradient_gram(model, X, strategy=s, **kw), G @ G.T)
        C = hbk.gradient_alignment(model, X, V, strategy=s, **kw)
        assert_close_scaled(C, ref_cosine(G, V), rtol=2e-4 if dtype == torch.float32 else 1e-9)
    return G


# ----------------------------------------------------------------------------- models
def mlp(d_in=2, widths=(7, 5), C=3, act=nn.ReLU, bias=True):
    layers, prev = [], d_in
    for w in widths:
        layers += [nn.Linear(prev, w, bias=bias), act()]
        prev = w
    layers.append(nn.Linear(prev, C, bias=bias))
    return nn.Sequential(*layers)


def mnist_cnn(C=3):
    """The paper's MNIST CNN (C = 3: 7203 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, C),
    )


def lenet5(C=10):
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, C),
    )


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


class Scale(nn.Module):
    """A custom parameterised layer the engine does not know (the fallback path)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class SeqModel(nn.Module):
    """Linear layers applied on (n, T, d) sequences, then mean-pooled."""

    def __init__(self, d=4, h=6, C=3):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, C)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))).mean(1)


class Reuse(nn.Module):
    """One Linear called twice (its factors concatenate along T)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Tied(nn.Module):
    """Two Linear modules sharing one weight (both go through the fallback)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class FunctionalUse(nn.Module):
    """A Linear whose weight is used by F.linear outside its own forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))


# ----------------------------------------------------------------------------- MLPs
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_matches_vmap(act, bias, dtype):
    torch.manual_seed(0)
    model = mlp(act=act, bias=bias).to(dtype)
    X = torch.randn(7, 2, dtype=dtype)
    check_all(model, X, block_size=3)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_single_feature_inputs_and_tiny_n(n, dtype):
    torch.manual_seed(1)
    model = mlp(d_in=1, widths=(10,), C=2).to(dtype)  # the paper's intro FNN (42 params)
    assert hbk.num_params(model) == 42
    X = torch.randn(n, 1, dtype=dtype)
    check_all(model, X)


@pytest.mark.parametrize("loss", ["ce", "nll", "mse"])
@pytest.mark.parametrize("mode", ["pred", "true", "tensor"])
def test_label_modes_and_losses(loss, mode, dtype):
    torch.manual_seed(2)
    model = mlp(d_in=3, widths=(6,), C=4, act=nn.Tanh).to(dtype)
    if loss == "nll":
        model.append(nn.LogSoftmax(dim=1))
    X = torch.randn(9, 3, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2])
    if mode == "pred":
        check_all(model, X, loss=loss, block_size=4)
    elif mode == "true":
        check_all(model, X, labels="true", targets=y, loss=loss, block_size=4)
    else:
        check_all(model, X, labels=y.to(torch.int32), loss=loss, block_size=4)


def test_pred_labels_differ_from_true_labels():
    """The default uses the model's own prediction, not the targets."""
    torch.manual_seed(3)
    model = mlp(widths=(5,)).double()
    X = torch.randn(6, 2, dtype=torch.float64)
    y = (pred(model, X) + 1) % 3
    g_pred = hbk.per_sample_grads(model, X)
    g_true = hbk.per_sample_grads(model, X, labels="true", targets=y)
    assert_close_scaled(g_pred, ref_grads(model, X, pred(model, X)))
    assert_close_scaled(g_true, ref_grads(model, X, y))
    assert not torch.allclose(g_pred, g_true)


# ----------------------------------------------------------------------------- CNNs
def test_mnist_cnn_matches_vmap(dtype):
    torch.manual_seed(4)
    model = mnist_cnn().to(dtype)
    assert hbk.num_params(model) == 7203
    X = torch.randn(5, 1, 28, 28, dtype=dtype)
    check_all(model, X, block_size=2)


def test_mnist_cnn_casts_raw_pixels():
    """A model that casts uint8 inputs itself (the paper's CNN): inputs are passed unchanged."""

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


def test_lenet5_matches_vmap(dtype):
    torch.manual_seed(6)
    model = lenet5().to(dtype)
    assert hbk.num_params(model) == 62006
    X = torch.randn(3, 3, 32, 32, dtype=dtype)
    check_all(model, X, block_size=2, strategies=["auto", "materialise"])


def test_lenet5_small_batch_ghost():
    torch.manual_seed(6)
    model = lenet5(C=3).double()
    assert hbk.num_params(model) == 61411
    X = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_all(model, X, strategies=["ghost"], k=2)


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=2, padding=1),
        dict(dilation=2, padding=2, bias=False),
        dict(groups=2, stride=(1, 2)),
        dict(groups=4, bias=False, padding="same"),
        dict(padding="same", padding_mode="reflect"),
        dict(padding=1, padding_mode="circular", groups=2),
        dict(padding="valid", kernel_size=(2, 3)),
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


# ----------------------------------------------------------------------------- other shapes
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)),
        lambda: nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3)),
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Tied()),
        lambda: nn.Sequential(nn.Linear(5, 3), FunctionalUse()),
        lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3)),
    ],
    ids=["layernorm", "custom-param", "tied", "functional-use", "conv1d"],
)
def test_fallback_for_other_parameters(make, dtype):
    torch.manual_seed(10)
    model = make().to(dtype)
    d = 5
    X = torch.randn(5, d, dtype=dtype)
    if isinstance(model[0], nn.Conv1d):
        X = X.unsqueeze(1)  # (n, 1, 5)
        model[0].weight.data.normal_()
    check_all(model, X, block_size=3)


def test_frozen_parameters_are_excluded(dtype):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3)).to(dtype)
    model[0].weight.requires_grad_(False)  # its bias falls back
    model[2].bias.requires_grad_(False)  # a ghost layer without a (trainable) bias
    X = torch.randn(6, 3, dtype=dtype)
    G = check_all(model, X, block_size=4)
    assert G.shape[1] == hbk.num_params(model) == 5 + 25 + 15 + 3


def test_batchnorm_eval_is_fine_and_train_is_refused():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch-coupled.*BatchNorm1d '1'"):
        hbk.gradient_alignment(model, X, torch.randn(hbk.num_params(model), 2).double())
    model.eval()
    model[1].running_mean.uniform_(-1, 1)
    check_all(model, X, block_size=2)
    bn = nn.BatchNorm1d(6, track_running_stats=False).double().eval()
    model2 = nn.Sequential(nn.Linear(3, 6), bn, nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="batch-coupled"):
        hbk.gradient_norms(model2, X)


def test_model_state_is_left_untouched():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.0), nn.Tanh(), Scale(6),
                          nn.Linear(6, 3)).double()
    model.train()
    model[3].eval()
    X = torch.randn(4, 3, dtype=torch.float64)
    V = torch.randn(hbk.num_params(model), 2, dtype=torch.float64)
    hbk.gradient_alignment(model, X, V)
    hbk.gradient_gram(model, X)
    hbk.per_sample_grads(model, X)
    hbk.gradient_covariance_eigs(model, X, 2)
    assert model.training and not model[3].training and model[0].training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_active_dropout_with_fallback_is_refused():
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), Scale(6), nn.Linear(6, 3)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dropout"):
        hbk.gradient_norms(model, X)
    model.eval()
    check_all(model, X)


# ----------------------------------------------------------------------------- alignment
def test_alignment_vector_shapes_and_zero_gradients():
    torch.manual_seed(14)
    model = mlp(widths=(6,), bias=False).double()
    X = torch.randn(5, 2, dtype=torch.float64)
    X[2] = 0.0  # no bias, ReLU'(0) = 0: g = 0 exactly
    G = ref_grads(model, X, pred(model, X))
    assert G[2].abs().max() == 0
    v = torch.randn(G.shape[1], dtype=torch.float64)
    c = hbk.gradient_alignment(model, X, v)
    assert c.shape == (5,)
    assert_close_scaled(c, ref_cosine(G, v[:, None])[:, 0])
    assert c[2] == 0
    V = torch.randn(G.shape[1], 3, dtype=torch.float64)
    V[:, 1] = 0  # a zero vector gives 0 too
    for s in STRATEGIES:
        C = hbk.gradient_alignment(model, X, V, strategy=s)
        assert torch.isfinite(C).all() and (C[2] == 0).all() and (C[:, 1] == 0).all()
        assert_close_scaled(C, ref_cosine(G, V))


def test_alignment_with_all_eigenvectors_picks_materialisation():
    """k = p orthonormal vectors: sum_j cos^2 = 1 for every sample (and 'auto' stays exact)."""
    torch.manual_seed(15)
    model = mlp(widths=(8, 8)).double()
    p = hbk.num_params(model)
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))
    X = torch.randn(6, 2, dtype=torch.float64)
    C = hbk.gradient_alignment(model, X, Q, block_size=4)
    assert_close_scaled(C.square().sum(1), torch.ones(6, dtype=torch.float64))
    assert_close_scaled(C, ref_cosine(ref_grads(model, X, pred(model, X)), Q))


def test_memory_budget_bounds_blocks_on_a_large_grid():
    """n = 300 x 300 inputs: many blocks under a small budget, every value exact."""
    torch.manual_seed(16)
    model = mlp(widths=(16, 16)).float()
    g = torch.linspace(-4, 4, 300)
    X = torch.cartesian_prod(g, g)
    V = torch.randn(hbk.num_params(model), 5)
    budget = 4 << 20
    C = hbk.gradient_alignment(model, X, V, memory_budget=budget)
    assert C.shape == (90_000, 5)
    idx = torch.randint(0, 90_000, (500,))
    ref = ref_cosine(ref_grads(model, X[idx], pred(model, X[idx])), V)
    assert_close_scaled(C[idx], ref, rtol=2e-4)
    from hbkernels.persample import _Engine

    eng = _Engine("t", model, X, "pred", "ce", None, None, budget, True)
    assert 1 < eng.block_size < 90_000 // 10


def test_auto_strategy_choices():
    """Ghost for few vectors on T = 1 layers; materialisation for k = p and for convs."""
    from hbkernels.persample import _Engine

    model = mnist_cnn().double()
    X = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    eng = _Engine("t", model, X, "pred", "ce", None, None, None, True)
    assert [q.T for q in eng.pairs] == [26 * 26, 11 * 11, 1]
    assert eng.choose("align", 25) == [False, False, True]
    assert eng.choose("align", 7203) == [False, False, False]
    assert eng.choose("norms") == [False, False, True]
    assert eng.choose("gram") == [False, False, True]


# ----------------------------------------------------------------------------- Gram / eigs
def test_gram_recompute_path_matches(dtype):
    """A budget too small for the compact store: block pairs are recomputed."""
    torch.manual_seed(17)
    for model, X in [
        (mlp(widths=(6, 5)).to(dtype), torch.randn(11, 2, dtype=dtype)),
        (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                       nn.Linear(48, 3)).to(dtype), torch.randn(7, 2, 4, 4, dtype=dtype)),
    ]:
        G = ref_grads(model, X, pred(model, X))
        for s in STRATEGIES:
            K = hbk.gradient_gram(model, X, strategy=s, block_size=3, memory_budget=64)
            assert_close_scaled(K, G @ G.T)
            assert torch.equal(K, K.T)


@pytest.mark.parametrize("budget", [None, 64], ids=["store", "recompute"])
def test_covariance_eigs_match_dense_eigh(budget, dtype):
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4),
                          nn.Tanh(), Scale(4), nn.Linear(4, 3)).to(dtype)
    X = torch.randn(9, 1, 6, 6, dtype=dtype)
    G = ref_grads(model, X, pred(model, X)).double()
    evals, evecs = torch.linalg.eigh(G.T @ G / 9)
    k = 4
    ref_vals, ref_vecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    for s in STRATEGIES:
        lam, V = hbk.gradient_covariance_eigs(model, X, k, strategy=s, block_size=4,
                                              memory_budget=budget)
        assert lam.shape == (k,) and V.shape == (G.shape[1], k) and V.dtype == dtype
        assert_close_scaled(lam.double(), ref_vals, rtol=1e-4 if dtype == torch.float32 else 1e-9)
        # Eigenvectors up to sign (the top eigenvalues are simple here).
        gaps = (ref_vals[:-1] - ref_vals[1:]) / ref_vals[0]
        assert gaps.min() > 1e-3
        signs = torch.sign((V.double() * ref_vecs).sum(0))
        tol = 5e-3 if dtype == torch.float32 else 1e-7
        torch.testing.assert_close(V.double() * signs, ref_vecs, atol=tol, rtol=0)


def test_covariance_eigs_rank_deficient():
    """k = n > rank: the missing directions come back as 0 with zero columns."""
    torch.manual_seed(19)
    model = mlp(widths=(5,)).double()
    X = torch.randn(3, 2, dtype=torch.float64)
    X = torch.cat([X, X[:1]])  # a repeated sample: rank 3
    lam, V = hbk.gradient_covariance_eigs(model, X, 4)
    assert lam[3] == 0 and (V[:, 3] == 0).all()
    assert_close_scaled(V[:, :3].T @ V[:, :3], torch.eye(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- errors
def test_input_validation():
    model = mlp().float()
    X = torch.randn(4, 2)
    p = hbk.num_params(model)
    V = torch.randn(p, 2)
    with pytest.raises(TypeError, match="hbk.gradient_alignment: expected model"):
        hbk.gradient_alignment(lambda x: x, X, V)
    with pytest.raises(TypeError, match="expected inputs to be a torch.Tensor"):
        hbk.gradient_norms(model, X.numpy())
    with pytest.raises(ValueError, match="n >= 1"):
        hbk.gradient_gram(model, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="expected labels to be 'pred', 'true'"):
        hbk.per_sample_grads(model, X, labels="predicted")
    with pytest.raises(ValueError, match="expected targets"):
        hbk.gradient_alignment(model, X, V, labels="true")
    with pytest.raises(TypeError, match="expected targets to be an integer tensor"):
        hbk.gradient_alignment(model, X, V, labels="true", targets=torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected labels of shape \(4,\)"):
        hbk.gradient_norms(model, X, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
        hbk.gradient_norms(model, X, labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="expected loss"):
        hbk.gradient_norms(model, X, loss="hinge")
    with pytest.raises(ValueError, match=r"expected vectors of shape \(" + str(p)):
        hbk.gradient_alignment(model, X, torch.randn(p + 1, 2))
    with pytest.raises(TypeError, match="expected vectors with the parameters' dtype"):
        hbk.gradient_alignment(model, X, V.double())
    with pytest.raises(ValueError, match="block_size >= 1"):
        hbk.gradient_norms(model, X, block_size=0)
    with pytest.raises(TypeError, match="memory_budget to be an int"):
        hbk.gradient_norms(model, X, memory_budget=1.5)
    with pytest.raises(ValueError, match="expected strategy"):
        hbk.gradient_gram(model, X, strategy="fast")
    with pytest.raises(ValueError, match=r"expected k <= n = 4"):
        hbk.gradient_covariance_eigs(model, X, 5)
    with pytest.raises(TypeError, match="expected model outputs of the parameters' dtype"):
        hbk.gradient_norms(nn.Sequential(nn.Linear(2, 3), ToDouble()), X)
    with pytest.raises(ValueError, match=r"outputs of shape \(n, C\)"):
        hbk.gradient_norms(nn.Sequential(nn.Linear(2, 3), nn.Flatten(0)), X)
    with pytest.raises(ValueError, match="trainable parameters"):
        hbk.gradient_norms(nn.Sequential(nn.Flatten()), X)
