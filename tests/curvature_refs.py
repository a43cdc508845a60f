"""Shared ground truth for the curvature tests: tiny models, data and the autograd Hessian of
the total loss over all samples (float64), independent of how the data is batched."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

N, C = 10, 3
SPLITS = [(0, 2), (2, 7), (7, 10)]


class SeqModel(nn.Module):
    """Embedding + LayerNorm + multi-head attention, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, C)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp_relu":
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, C))
    elif name == "mlp_tanh":
        m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, C))
    elif name == "cnn":
        m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, C))
    elif name == "seq":
        m = SeqModel()
    else:  # BatchNorm with non-trivial running statistics, in eval mode
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, C))
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.data.uniform_(0.5, 1.5)
        m[1].bias.data.uniform_(-0.5, 0.5)
    return m.double().eval()


def make_inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "cnn":
        return torch.randn(N, 1, 6, 6, generator=g, dtype=torch.float64)
    if name == "seq":
        return torch.randint(0, 7, (N, 4), generator=g)
    return torch.randn(N, 4, generator=g, dtype=torch.float64)


def make_targets(loss: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if loss in ("ce", "nll"):
        return torch.randint(0, C, (N,), generator=g)
    if loss == "bce":
        return torch.randint(0, 2, (N, C), generator=g).double()
    return torch.randn(N, C, generator=g, dtype=torch.float64)


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss, "nll": nn.NLLLoss}


def problem(model_name: str, loss: str):
    """(model, X, y): NLL gets the model's log-probabilities."""
    model = make_model(model_name)
    if loss == "nll":
        model = nn.Sequential(model, nn.LogSoftmax(-1)).eval()
    return model, make_inputs(model_name), make_targets(loss)


@functools.cache
def reference(model_name: str, loss: str, reduction: str) -> tuple[torch.Tensor, float]:
    """(Hessian, loss value) of the loss over all N samples, float64."""
    model, X, y = problem(model_name, loss)
    loss_fn = LOSSES[loss](reduction=reduction)
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    numels = [p.numel() for p in named.values()]
    buffers = dict(model.named_buffers())

    def f(theta: torch.Tensor) -> torch.Tensor:
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return loss_fn(functional_call(model, {**d, **buffers}, (X,)), y)

    theta0 = torch.cat([p.detach().reshape(-1) for p in named.values()])
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(f, theta0, vectorize=True)
        value = float(f(theta0))
    return H, value


def data_for(X: torch.Tensor, y: torch.Tensor, batches: str):
    return (X, y) if batches == "one" else [(X[a:b], y[a:b]) for a, b in SPLITS]


MODELS = ["mlp_relu", "mlp_tanh", "cnn", "seq", "bn_eval"]
CHAIN_MODELS = ("mlp_relu", "mlp_tanh")


def flat_fn(model: nn.Module, fn):
    """``(theta0, f)`` with ``f(theta) = fn(lambda x: model at theta applied to x)``."""
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    numels = [p.numel() for p in named.values()]
    buffers = dict(model.named_buffers())

    def f(theta: torch.Tensor):
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return fn(lambda *x: functional_call(model, {**d, **buffers}, x))

    return torch.cat([p.detach().reshape(-1) for p in named.values()]), f


def ce_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy over (X, y), by torch.autograd.functional.hessian."""
    theta0, f = flat_fn(model, lambda call: F.cross_entropy(call(X), y))
    return torch.autograd.functional.hessian(f, theta0)


@functools.cache
def reference_ggn(model_name: str, loss: str, reduction: str) -> torch.Tensor:
    """``J^T H_out J`` with J by torch.autograd.functional.jacobian (float64)."""
    model, X, y = problem(model_name, loss)
    loss_fn = LOSSES[loss](reduction=reduction)
    theta0, outputs = flat_fn(model, lambda m: m(X))
    with sdpa_kernel(SDPBackend.MATH):
        out = outputs(theta0).detach()
        J = torch.autograd.functional.jacobian(outputs, theta0).reshape(out.numel(), -1)
        Hout = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y),
                                                 out.reshape(-1))
    return J.T @ Hout @ J
