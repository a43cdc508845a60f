"""method="compiled" (torch.compile of the forward-over-reverse HVP) against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbkernels as hbk
from hbkernels.hvp import compiled as compiled_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    return model, X, y


@pytest.mark.slow  # one inductor compile: 10-100 s on the shared 2-core machine
def test_compiled_matches_autograd_hessian() -> None:
    model, X, y = tiny()
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, [p.numel() for p in params])
        named = {n: c.view(s) for (n, _), c, s in zip(model.named_parameters(), chunks, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, named, (X,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(flat_loss, theta)
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y), method="compiled")
    assert op.method == "compiled"
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op @ V, H @ V, atol=1e-12, rtol=1e-10)
    assert op.strategy.num_compiles == 1 and op.strategy.compile_seconds > 0
    torch.testing.assert_close(op @ (2 * V), 2 * (H @ V), atol=1e-12, rtol=1e-10)
    assert op.strategy.num_compiles == 1  # cached: same block size and batch shapes


def test_compiled_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, X, y = tiny()
    monkeypatch.setattr(compiled_mod, "compile_unavailable_reason",
                        lambda: "torch.compile unsupported on Python 9.9")
    with pytest.raises(RuntimeError, match=r"hbk.HessianOperator: expected torch.compile to be "
                                           r"available for method='compiled', got torch.compile "
                                           r"unsupported on Python 9.9"):
        hbk.HessianOperator(model, F.cross_entropy, (X, y), method="compiled")


def test_auto_never_picks_compiled() -> None:
    model, X, y = tiny()
    assert hbk.HessianOperator(model, F.cross_entropy, (X, y)).method != "compiled"
