"""The cost model (hbkernels/persample/planning.py): forms per pair and block sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled
from persample_refs import mlp, mnist_cnn, pred, ref_cosine, ref_grads

import hbkernels as hbk
from hbkernels.persample.capture import Pair
from hbkernels.persample.engine import Engine
from hbkernels.persample.options import parse_options
from hbkernels.persample.planning import Work, block_size, choose_forms

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(model, X, work, **opts):
    return Engine("t", model, X, parse_options("t", opts), work)


def test_auto_strategy_choices():
    """Ghost for few vectors on T = 1 layers; materialisation for k = p and for convs."""
    model = mnist_cnn().double()
    X = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    assert _engine(model, X, Work(norms=True, k=25)).ghost == [False, False, True]
    assert _engine(model, X, Work(norms=True, k=7203)).ghost == [False, False, False]
    assert _engine(model, X, Work(norms=True)).ghost == [False, False, True]
    assert _engine(model, X, Work(gram=True)).ghost == [False, False, True]
    assert _engine(model, X, Work(rows=True)).ghost == [False, False, False]
    assert _engine(model, X, Work(norms=True), strategy="ghost").ghost == [True] * 3


def test_one_pass_costs_add_up():
    """A pass of several products adds their costs: T = 1 pairs stay ghost for norms + Gram +
    few vectors; a wide layer with many vectors materialises."""
    q = Pair(0, 0, d_in=100, d_out=100, w_offset=0, b_offset=None, T=1)
    assert choose_forms([q], Work(norms=True, k=25, gram=True, n=4096), "auto") == [True]
    assert choose_forms([q], Work(norms=True, k=200, n=4096), "auto") == [False]
    conv = Pair(0, 0, d_in=9, d_out=16, w_offset=0, b_offset=0, T=26 * 26)
    assert choose_forms([conv], Work(norms=True, k=1, gram=True, n=64), "auto") == [False]


def test_block_size_from_budget():
    assert block_size(100, 10**9, 8, 10, 10, 0, 0, None) == 100
    assert block_size(100, 10**9, 8, 10, 10, 0, 0, 7) == 7
    small = block_size(10**6, 1 << 20, 4, 50, 50, 0, 0, None)
    assert 1 < small < 10**6 and (4 * 50 + 2 * 50 + 16) * 4 * small <= 1 << 20


def test_memory_budget_bounds_blocks_on_a_large_grid():
    """n = 200 x 200 inputs: many blocks under a small budget, every value exact."""
    torch.manual_seed(16)
    model = mlp(widths=(16, 16)).float()
    g = torch.linspace(-4, 4, 200)
    X = torch.cartesian_prod(g, g)
    V = torch.randn(hbk.num_params(model), 5)
    budget = 4 << 20
    C = hbk.gradient_alignment(model, X, V, memory_budget=budget)
    assert C.shape == (40_000, 5)
    idx = torch.randint(0, 40_000, (300,))
    ref = ref_cosine(ref_grads(model, X[idx], pred(model, X[idx])), V)
    assert_close_scaled(C[idx], ref, rtol=2e-4)
    eng = _engine(model, X, Work(norms=True, k=5), memory_budget=budget)
    assert 1 < eng.block_size < 40_000 // 10


def test_direct_rule_rate_tips_small_convolutions_to_materialisation():
    """Norms of a conv pair with T = 4: ghost without a direct rule (T^2 d < T p_l); with the
    grouped-convolution gradient (DIRECT_RATE) and the unfold cost of the ghost form,
    materialisation."""
    conv = Pair(0, 0, d_in=9, d_out=16, w_offset=0, b_offset=0, T=4)
    assert choose_forms([conv], Work(norms=True, n=64), "auto") == [True]
    assert choose_forms([conv], Work(norms=True, n=64), "auto", [True]) == [False]
    assert choose_forms([conv], Work(norms=True, n=64), "ghost", [True]) == [True]
    lin = Pair(0, 0, d_in=100, d_out=3, w_offset=0, b_offset=0, T=1)
    assert choose_forms([lin], Work(norms=True, k=5, n=64), "auto", [False]) == [True]


def test_blocks_capped_at_the_working_set():
    from hbkernels.persample.planning import BLOCK_BYTES, MIN_BLOCK

    per = (4 * 1000 + 2 * 500 + 16) * 4
    b = block_size(10**6, 10**12, 4, 1000, 500, 0, 0, None)
    assert b == BLOCK_BYTES // per and b * per <= BLOCK_BYTES
    assert block_size(10**6, 10**12, 4, 10**7, 0, 0, 0, None) == MIN_BLOCK  # huge samples
    assert block_size(10**6, 10**6, 4, 10**7, 0, 0, 0, None) == 1  # the budget wins
