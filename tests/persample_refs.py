"""Ground truth and models for the per-sample tests (tests/test_persample_*.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from torch import nn
from torch.func import functional_call, grad, vmap

import hbkernels as hbk
from hbkernels.losses import as_loss
from hbkernels.params import trainable_parameters

STRATEGIES = ["auto", "ghost", "materialise"]


# ----------------------------------------------------------------------------- references
def _call(model, x, forward):
    if forward is not None:
        return forward(model, x)
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _one(x):
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, dict):
        return {k: v.unsqueeze(0) for k, v in x.items()}
    return type(x)(v.unsqueeze(0) for v in x)


def _in_dims(x):
    if isinstance(x, torch.Tensor):
        return 0
    if isinstance(x, dict):
        return {k: 0 for k in x}
    return type(x)(0 for _ in x)


def ref_grads(model: nn.Module, X, y: torch.Tensor, loss="ce", forward=None) -> torch.Tensor:
    """(n, p) per-sample gradients of the trainable parameters by vmap(grad(functional_call)):
    each sample's loss is the loss of a batch of one."""
    L = as_loss("ref", loss)
    names = {id(p): nm for nm, p in model.named_parameters()}
    train = [names[id(p)] for p in trainable_parameters(model)]
    allp = {nm: p.detach() for nm, p in model.named_parameters()}
    theta = {nm: allp.pop(nm) for nm in train}

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return _call(self.m, x, forward)

    wrap = Wrap()

    def f(th, x, t):
        params = {"m." + k: v for k, v in {**allp, **th}.items()}
        out = functional_call(wrap, params, (_one(x),))
        return L(out, t.unsqueeze(0))

    g = vmap(grad(f), in_dims=(None, _in_dims(X), 0))(theta, X, y)
    n = y.shape[0]
    return torch.cat([g[nm].reshape(n, -1) for nm in train], 1)


def loop_grads(model: nn.Module, X, y: torch.Tensor, loss="ce", forward=None) -> torch.Tensor:
    """The same by one autograd backward per sample (a batch of one each)."""
    L = as_loss("ref", loss)
    params = trainable_parameters(model)
    rows = []
    for i in range(y.shape[0]):
        xi = X[i : i + 1] if isinstance(X, torch.Tensor) else (
            {k: v[i : i + 1] for k, v in X.items()} if isinstance(X, dict)
            else type(X)(v[i : i + 1] for v in X))
        gs = torch.autograd.grad(L(_call(model, xi, forward), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def ref_cosine(G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    gn, vn = G.norm(dim=1, keepdim=True), V.norm(dim=0, keepdim=True)
    return torch.where((gn > 0) & (vn > 0), (G @ V) / (gn * vn).clamp_min(1e-300), 0.0)


def pred(model: nn.Module, X, forward=None) -> torch.Tensor:
    with torch.no_grad():
        return _call(model, X, forward).argmax(1)


def check_all(model, X, *, labels="pred", loss="ce", targets=None, block_size=None,
              strategies=STRATEGIES, k=4, seed=0, forward=None):
    """Every public function vs the reference, for each strategy; returns G."""
    if isinstance(labels, torch.Tensor):
        y = labels
    elif labels == "true":
        y = targets
    else:
        y = pred(model, X, forward)
    G = ref_grads(model, X, y, loss, forward)
    kw = {"labels": labels, "loss": loss, "targets": targets, "block_size": block_size, "forward": forward}
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
    """The paper's MNIST CNN (C = 3: 7203 parameters): convolutions with max pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, C),
    )


def small_cnn(C=3):
    """A tiny CNN with average and max pooling (6x6 inputs)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 2), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(4, C),
    )


def lenet5(C=10):
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, C),
    )


def bn_cnn(C=3):
    """Convolution + BatchNorm (use in eval mode) + pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(36, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, C),
    )


class TinyTransformer(nn.Module):
    """Embedding + LayerNorm + self-attention + MLP head on token ids (n, L)."""

    def __init__(self, vocab=11, d=8, heads=2, C=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(d, C)

    def forward(self, ids, mask=None):
        h = self.ln(self.emb(ids))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(torch.tanh(self.ff(h)).mean(1))


class DictModel(nn.Module):
    """A two-input model called as model(image=..., extra=...) returning an output object."""

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self, C=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4 + 2, C)

    def forward(self, image, extra):
        h = torch.relu(self.conv(image)).flatten(1)
        return DictModel.Out(self.fc(torch.cat([h, extra], 1)))


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


def confident_mlp(dtype, gap=60.0, seed=0):
    """A float MLP whose class-0 logit exceeds the others by about ``gap``: per-sample CE
    gradients ~exp(-gap) (1e-26 for gap 60), squared norms ~1e-52 (below float32's range)."""
    torch.manual_seed(seed)
    model = mlp(d_in=3, widths=(6, 5), C=3, act=nn.Tanh)
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([gap, 0.0, 0.0]))
    return model.to(dtype)


class AttnModel(nn.Module):
    """A Linear input projection, one ``nn.MultiheadAttention`` (self-attention) and a head;
    with ``need_weights`` the attention weights enter the output too."""

    def __init__(self, d_in=3, d=6, heads=2, C=3, batch_first=True, bias=True,
                 need_weights=False):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, batch_first=batch_first)
        self.head = nn.Linear(d, C)
        self.need_weights = need_weights

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if not self.attn.batch_first:
            h = h.transpose(0, 1)
        a, w = self.attn(h, h, h, need_weights=self.need_weights)
        if not self.attn.batch_first:
            a = a.transpose(0, 1)
        out = self.head(a.mean(1))
        if w is not None:
            out = out + w.pow(2).sum((1, 2))[:, None]
        return out


class PosTransformer(nn.Module):
    """Embedding + a learned positional parameter + TransformerEncoderLayer (batch_first) +
    LayerNorm + Linear head on token ids (n, L)."""

    def __init__(self, vocab=11, L=5, d=8, heads=2, ff=12, C=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(L, d) * 0.3)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        return self.head(self.ln(self.enc(h)).mean(1))
