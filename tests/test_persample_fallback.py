"""The torch.func fallback (hbkernels/persample/fallback.py) for parameters without a rule."""

from __future__ import annotations

import pytest
import torch
from persample_refs import FunctionalUse, Scale, Tied, TinyTransformer, check_all
from torch import nn

from hbkernels.persample.engine import Engine
from hbkernels.persample.options import parse_options
from hbkernels.persample.planning import Work

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)),
        lambda: nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Tanh(), nn.Linear(6, 3)),
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Tied()),
        lambda: nn.Sequential(nn.Linear(5, 3), FunctionalUse()),
    ],
    ids=["layernorm", "custom-param", "tied", "functional-use"],
)
def test_fallback_for_other_parameters(make, dtype):
    torch.manual_seed(10)
    model = make().to(dtype)
    X = torch.randn(5, 5, dtype=dtype)
    check_all(model, X, block_size=3)


def test_which_parameters_fall_back():
    model = TinyTransformer().double().eval()
    ids = torch.randint(0, 11, (3, 4))
    eng = Engine("t", model, ids, parse_options("t", {}), Work(norms=True))
    # Embedding (one-hot pair), LayerNorm (direct rule), attention (in/out projection pairs):
    # nothing falls back.
    assert eng.fallback is None
    assert "attn" in [layer.name for layer in eng.layers]
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Tied(), FunctionalUse()).double()
    eng = Engine("t", model, torch.randn(3, 5).double(), parse_options("t", {}), Work(norms=True))
    # Tied weights and a weight used by F.linear outside its module: the fallback.
    assert eng.fallback.names == ["2.a.weight", "2.a.bias", "2.b.bias", "3.a.weight",
                                  "3.a.bias"]


def test_fallback_with_a_custom_forward_reaching_submodules():
    """forward(model, x) may call submodules: the fallback swaps their parameters too."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    fwd = lambda m, x: m[3](m[2](m[1](m[0](x))))
    check_all(model, torch.randn(4, 4, dtype=torch.float64), forward=fwd, k=2)
