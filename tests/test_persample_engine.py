"""The per-sample engine end to end (hbkernels/persample/engine.py, options.py, inputs.py):
models x dtypes, labels and losses, input forms, scaling against underflow, refusals, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from persample_refs import (
    DictModel,
    TinyTransformer,
    bn_cnn,
    check_all,
    confident_mlp,
    loop_grads,
    mlp,
    mnist_cnn,
    pred,
    ref_cosine,
    ref_grads,
    small_cnn,
)
from torch import nn

import hbkernels as hbk
from hbkernels.persample.engine import Engine
from hbkernels.persample.options import parse_options
from hbkernels.persample.planning import Work

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- model matrix
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


def test_cnn_with_pooling(dtype):
    torch.manual_seed(4)
    model = small_cnn().to(dtype)
    X = torch.randn(5, 2, 6, 6, dtype=dtype)
    check_all(model, X, block_size=2)


def test_mnist_cnn_matches_vmap():
    torch.manual_seed(4)
    model = mnist_cnn().double()
    assert hbk.num_params(model) == 7203
    X = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    check_all(model, X, block_size=2, k=2)


def test_transformer_with_embedding_layernorm_attention(dtype):
    """Embedding (one-hot pair) and LayerNorm (direct rule) by rules; the attention's in/out
    projections (used functionally) through the torch.func fallback."""
    torch.manual_seed(5)
    model = TinyTransformer().to(dtype).eval()
    ids = torch.randint(0, 11, (5, 4))
    check_all(model, ids, block_size=2, k=3)


def test_batchnorm_eval_is_fine_and_train_is_refused(dtype):
    torch.manual_seed(12)
    model = bn_cnn().to(dtype)
    X = torch.randn(5, 2, 6, 6, dtype=dtype)
    with pytest.raises(ValueError, match="batch-coupled.*BatchNorm2d '1'"):
        hbk.gradient_norms(model, X)
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[6].running_var.uniform_(0.5, 2)
    check_all(model, X, block_size=2, k=3)
    bn = nn.BatchNorm1d(6, track_running_stats=False).double().eval()
    with pytest.raises(ValueError, match="batch-coupled"):
        hbk.gradient_norms(nn.Sequential(nn.Linear(3, 6), bn, nn.Linear(6, 3)).double(),
                           torch.randn(4, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- labels, losses
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


@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(label_smoothing=0.1),
     nn.MSELoss(), "bce", lambda o, t: (o.logsumexp(1) - o.gather(1, t[:, None])[:, 0]).mean()],
    ids=["ce-sum-module", "ce-smoothing", "mse-module-regression", "bce", "callable"],
)
def test_losses_from_the_registry(loss):
    """Module losses (any reduction: a sample's loss is a batch of one), BCE, callables."""
    torch.manual_seed(3)
    model = mlp(d_in=3, widths=(5,), C=3, act=nn.Tanh).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    if isinstance(loss, nn.MSELoss) or loss == "bce":
        t = torch.rand(6, 3, dtype=torch.float64)  # regression / multi-label targets
        check_all(model, X, labels=t, loss=loss, block_size=4, k=2)
        if loss == "bce":  # 'pred' for BCE: the model's own (outputs > 0)
            check_all(model, X, loss=loss, labels=(model(X) > 0).double().detach(), k=2)
    else:
        check_all(model, X, loss=loss, block_size=4, k=2)


def test_pred_labels_differ_from_true_labels():
    torch.manual_seed(3)
    model = mlp(widths=(5,)).double()
    X = torch.randn(6, 2, dtype=torch.float64)
    y = (pred(model, X) + 1) % 3
    g_pred = hbk.per_sample_grads(model, X)
    g_true = hbk.per_sample_grads(model, X, labels="true", targets=y)
    assert_close_scaled(g_pred, ref_grads(model, X, pred(model, X)))
    assert_close_scaled(g_true, ref_grads(model, X, y))
    assert not torch.allclose(g_pred, g_true)


# ----------------------------------------------------------------------------- input forms
def test_tuple_dict_and_forward_inputs(dtype):
    torch.manual_seed(6)
    model = DictModel().to(dtype)
    batch = {"image": torch.randn(5, 1, 6, 6, dtype=dtype), "extra": torch.randn(5, 2, dtype=dtype)}
    fwd = lambda m, b: m(**b).logits
    G = check_all(model, batch, forward=fwd, block_size=2, k=3)
    assert_close_scaled(G, loop_grads(model, batch, pred(model, batch, fwd), forward=fwd))
    tfwd = lambda m, b: m(*b).logits
    tup = (batch["image"], batch["extra"])
    assert_close_scaled(hbk.per_sample_grads(model, tup, forward=tfwd), G)


def test_dict_inputs_called_as_keywords():
    torch.manual_seed(7)
    model = TinyTransformer().double().eval()
    batch = {"ids": torch.randint(0, 11, (4, 5)), "mask": (torch.rand(4, 5) > 0.3).double()}
    G = check_all(model, batch, k=2, strategies=["auto"])
    y = pred(model, batch)
    assert_close_scaled(G, loop_grads(model, batch, y))


def test_inputs_errors():
    model = DictModel().double()
    good = {"image": torch.randn(3, 1, 6, 6, dtype=torch.float64),
            "extra": torch.randn(3, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"sample dimension first \(3, \.\.\.\).*'extra'"):
        hbk.gradient_norms(model, {**good, "extra": good["extra"][:2]},
                           forward=lambda m, b: m(**b).logits)
    with pytest.raises(TypeError, match="forward to be a callable"):
        hbk.gradient_norms(model, good, forward="logits")
    with pytest.raises(ValueError, match=r"outputs of shape \(n, \.\.\.\)"):
        hbk.gradient_norms(model, good)  # the output object needs forward=
    with pytest.raises(TypeError, match="expected inputs to be a torch.Tensor, a tuple or a dict"):
        hbk.gradient_norms(model, 3.0)


# ----------------------------------------------------------------------------- scaling
def test_underflow_confident_float32_model():
    """Logit gap 60: float32 gradients ~1e-26, squared norms ~1e-52. Norms and cosines agree
    with float64 (vmap(grad)), not 0."""
    m32 = confident_mlp(torch.float32)
    m64 = confident_mlp(torch.float64)
    X = torch.randn(8, 3)
    y = pred(m64, X.double())
    assert (y == 0).all()
    G = ref_grads(m64, X.double(), y)
    gn = G.norm(dim=1)
    assert 1e-30 < gn.max() < 1e-22  # the regime: squares below float32's smallest subnormal
    V = torch.randn(G.shape[1], 4, dtype=torch.float64)
    ref = ref_cosine(G, V)
    assert ref.abs().max() > 0.1
    for s in ["auto", "ghost", "materialise"]:
        n32 = hbk.gradient_norms(m32, X, strategy=s)
        assert n32.dtype == torch.float32
        torch.testing.assert_close(n32.double(), gn, rtol=1e-4, atol=0)
        c32 = hbk.gradient_alignment(m32, X, V.float(), strategy=s)
        torch.testing.assert_close(c32.double(), ref, rtol=0, atol=1e-4)
        c64 = hbk.gradient_alignment(m64, X.double(), V, strategy=s)
        assert_close_scaled(c64, ref, rtol=1e-9)
    # The same answer as float64 on rescaled inputs: the gradients scaled by 2^80 are ~1e-2.
    P = hbk.per_sample_products(m32, X, norms=True, vectors=V.float())
    torch.testing.assert_close(P.norms.double(), gn, rtol=1e-4, atol=0)
    torch.testing.assert_close(P.alignment["vectors"].double(), ref, rtol=0, atol=1e-4)


def test_underflow_with_fallback_parameters():
    """The fallback's rows are scaled with the factors (LayerNorm in the middle)."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        base[-1].bias.copy_(torch.tensor([70.0, 0.0, 0.0]))
    m32, m64 = base.float(), _copy(base).double()
    X = torch.randn(5, 3)
    G = ref_grads(m64, X.double(), pred(m64, X.double()))
    V = torch.randn(G.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(hbk.gradient_norms(m32, X).double(), G.norm(dim=1), rtol=1e-4,
                               atol=0)
    torch.testing.assert_close(hbk.gradient_alignment(m32, X, V.float()).double(),
                               ref_cosine(G, V), rtol=0, atol=1e-4)


def test_large_gradients_do_not_overflow():
    """MSE regression on targets ~3e19: gradients ~1e20, squared norms ~1e41 exceed float32's
    range (3.4e38); norms and cosines stay finite and right."""
    torch.manual_seed(2)
    base = mlp(d_in=3, widths=(5,), C=3, act=nn.Tanh)
    m32, m64 = base.float(), _copy(base).double()
    X = torch.randn(4, 3)
    t = torch.randn(4, 3, dtype=torch.float64) * 3e19
    G = ref_grads(m64, X.double(), t, "mse")
    assert G.norm(dim=1).min() > 1e19 and G.norm(dim=1).max() < 1e30
    n32 = hbk.gradient_norms(m32, X, labels=t.float(), loss="mse")
    torch.testing.assert_close(n32.double(), G.norm(dim=1), rtol=1e-4, atol=0)
    V = torch.randn(G.shape[1], 2, dtype=torch.float64)
    c32 = hbk.gradient_alignment(m32, X, V.float(), labels=t.float(), loss="mse")
    torch.testing.assert_close(c32.double(), ref_cosine(G, V), rtol=0, atol=1e-4)


def test_tiny_vectors_give_cosines():
    """Vectors of size 1e-30 (squared norms below float32's range) give the same cosines."""
    torch.manual_seed(3)
    model = mlp(widths=(5,)).float()
    X = torch.randn(4, 2)
    G = ref_grads(model.double(), X.double(), pred(model.double(), X.double()))
    model.float()
    V = torch.randn(G.shape[1], 2, dtype=torch.float64)
    c = hbk.gradient_alignment(model, X, (V * 1e-30).float())
    torch.testing.assert_close(c.double(), ref_cosine(G, V), rtol=0, atol=1e-4)


def _copy(m):
    import copy

    return copy.deepcopy(m)


# ----------------------------------------------------------------------------- state, refusals
def test_model_state_is_left_untouched():
    torch.manual_seed(13)
    from persample_refs import Scale

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
    hbk.per_sample_products(model, X, norms=True, vectors=V, gram=True, class_gram=True)
    assert model.training and not model[3].training and model[0].training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_active_dropout_is_refused():
    """Active dropout makes every call a different function: refused (issue: two identical
    calls differed by 0.3-0.5)."""
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="deterministic model.*Dropout"):
        hbk.gradient_alignment(model, X, torch.randn(hbk.num_params(model), 2).double())
    # Opting in: the factor path differentiates one draw per call.
    hbk.gradient_norms(model, X, check_deterministic=False)
    from persample_refs import FunctionalUse

    fb = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), FunctionalUse()).double()
    with pytest.raises(ValueError, match="no active dropout when some parameters need"):
        hbk.gradient_norms(fb, X, check_deterministic=False)
    fb.eval()
    check_all(fb, X)


def test_engine_is_complete_after_construction():
    model = mnist_cnn().double()
    X = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    opts = parse_options("t", {})
    eng = Engine("t", model, X, opts, Work(norms=True, k=25))
    assert [q.T for q in eng.pairs] == [26 * 26, 11 * 11, 1]
    assert eng.ghost == [False, False, True]
    assert eng.block_size == 2 and eng.layout.width == 16 * 9 + 16 + 32 * 144 + 32
    f = eng.capture(0, 2)
    assert f.n == 2 and f.scale.dtype == torch.float64


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
    with pytest.raises(TypeError, match="expected vectors of a floating-point dtype"):
        hbk.gradient_alignment(model, X, V.long())
    with pytest.raises(ValueError, match="block_size >= 1"):
        hbk.gradient_norms(model, X, block_size=0)
    with pytest.raises(TypeError, match="memory_budget to be an int"):
        hbk.gradient_norms(model, X, memory_budget=1.5)
    with pytest.raises(ValueError, match="expected strategy"):
        hbk.gradient_gram(model, X, strategy="fast")
    with pytest.raises(TypeError, match="expected options among"):
        hbk.gradient_gram(model, X, stratgy="ghost")
    with pytest.raises(ValueError, match=r"expected k <= n = 4"):
        hbk.gradient_covariance_eigs(model, X, 5)
    with pytest.raises(TypeError, match="expected model outputs of the parameters' dtype"):
        from persample_refs import ToDouble

        hbk.gradient_norms(nn.Sequential(nn.Linear(2, 3), ToDouble()), X)
    with pytest.raises(ValueError, match=r"outputs of shape \(n, C\) for labels='pred'"):
        hbk.gradient_norms(nn.Sequential(nn.Linear(2, 1), nn.Flatten(0)), X)
    with pytest.raises(ValueError, match="trainable parameters"):
        hbk.gradient_norms(nn.Sequential(nn.Flatten()), X)
