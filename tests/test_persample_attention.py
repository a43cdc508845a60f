"""Attention and bare-parameter rules (hbkernels/persample/capture.py) against vmap(grad)."""

from __future__ import annotations

import pytest
import torch
from persample_refs import AttnModel, PosTransformer, check_all
from torch import nn

from hbkernels.persample.capture import AttentionRule, BareRule, attention_forward
from hbkernels.persample.engine import Engine
from hbkernels.persample.options import parse_options
from hbkernels.persample.planning import Work

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(model, X):
    return Engine("t", model, X, parse_options("t", {}), Work(norms=True))


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tbd"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["noweights", "weights"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_multihead_attention_matches_vmap(batch_first, need_weights, bias):
    torch.manual_seed(20)
    model = AttnModel(batch_first=batch_first, bias=bias, need_weights=need_weights).double()
    X = torch.randn(5, 4, 3, dtype=torch.float64)
    eng = _engine(model, X)
    assert eng.fallback is None  # in_proj_weight and out_proj by the rule
    attn = next(layer for layer in eng.layers if layer.name == "attn")
    assert isinstance(attn.rule, AttentionRule) and len(attn.pairs) == 2
    assert [(eng.pairs[j].d_in, eng.pairs[j].d_out, eng.pairs[j].T) for j in attn.pairs] == [
        (6, 18, 4), (6, 6, 4)]
    check_all(model, X, block_size=3, k=3)


def test_transformer_with_positional_parameter_matches_vmap():
    torch.manual_seed(21)
    model = PosTransformer().double().eval()
    ids = torch.randint(0, 11, (6, 5))
    eng = _engine(model, ids)
    assert eng.fallback is None
    pos = next(layer for layer in eng.layers if layer.name == "pos")
    assert isinstance(pos.rule, BareRule) and pos.direct
    check_all(model, ids, block_size=4, k=3)


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tbd"])
def test_attention_forward_equals_the_module(batch_first):
    """Same outputs and weights as the module (eval, masks, per-head weights); the module's
    forward, mode and hooks are left as they were by a capture."""
    torch.manual_seed(22)
    m = nn.MultiheadAttention(6, 3, batch_first=batch_first).double().eval()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    kpm = torch.zeros(4, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    cases = [{}, {"need_weights": False}, {"attn_mask": causal},
             {"key_padding_mask": kpm, "average_attn_weights": False},
             {"attn_mask": causal, "is_causal": True, "need_weights": False},
             {"attn_mask": torch.randn(4 * 3, 5, 5, dtype=torch.float64), "key_padding_mask": kpm}]
    for kw in cases:
        for grad in (False, True):  # the module's fast path (no grad) and its slow path
            with torch.set_grad_enabled(grad):
                ref = m(x, x, x, **kw)
                out, w, _ = attention_forward(m, x, x, x, **kw)
            torch.testing.assert_close(out, ref[0], rtol=1e-12, atol=1e-12)
            if ref[1] is None:
                assert w is None
            else:
                torch.testing.assert_close(w, ref[1], rtol=1e-12, atol=1e-12)
    model = AttnModel(batch_first=batch_first).double().eval()
    X = torch.randn(3, 4, 3, dtype=torch.float64)
    before = model(X)
    check_all(model, X, k=2, strategies=["auto"])
    assert "forward" not in model.attn.__dict__ and not model.training
    assert not model.attn._forward_hooks and not model.attn._forward_pre_hooks
    torch.testing.assert_close(model(X), before, rtol=0, atol=0)


def test_unsupported_attention_and_bare_uses_fall_back():
    """Cross-attention, kdim != embed_dim and non-elementwise uses of a bare parameter go to
    the torch.func fallback (still exact)."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(3, 6)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.kv = nn.MultiheadAttention(6, 2, kdim=3, vdim=3, batch_first=True)
            self.w = nn.Parameter(torch.randn(6, 3) * 0.3)
            self.s = nn.Parameter(torch.linspace(0.5, 1.5, 3))

        def forward(self, x):
            h = torch.tanh(self.q(x))
            a, _ = self.attn(h, x @ self.w.T, h)  # key is not query: cross-attention
            b, _ = self.kv(a, x, x)
            return (b.mean(1) @ self.w) * self.s

    torch.manual_seed(23)
    model = Cross().double()
    X = torch.randn(4, 5, 3, dtype=torch.float64)
    eng = _engine(model, X)
    names = eng.fallback.names
    assert "attn.in_proj_weight" in names and "attn.out_proj.weight" in names
    assert "kv.q_proj_weight" in names and "w" in names
    assert "s" not in names  # x * s: the bare rule
    check_all(model, X, k=2, strategies=["auto"])


def test_bare_parameter_uses_and_inplace():
    """x + p, p - x, x - p, x * p with broadcasting (leading singleton dims) and an in-place
    op on the result; a parameter used twice is recorded twice."""

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.a = nn.Parameter(torch.randn(1, 5, 4) * 0.3)
            self.b = nn.Parameter(torch.randn(4) * 0.3)
            self.c = nn.Parameter(torch.randn(5, 1) * 0.3)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.lin(x)) + self.a
            h = self.b - h
            h.mul_(2.0)
            h = torch.tanh(h * self.c) * self.c - self.b
            return self.head(h.mean(1))

    torch.manual_seed(24)
    model = Bare().double()
    X = torch.randn(5, 5, 3, dtype=torch.float64)
    eng = _engine(model, X)
    assert eng.fallback is None
    check_all(model, X, block_size=2, k=2)
