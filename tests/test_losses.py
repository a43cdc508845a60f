"""The loss registry: every form of the loss argument, reductions stated or probed, per-sample
losses and the closed-form output Hessians against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbkernels.losses import as_loss


def outputs_and_targets(kind: str, n: int = 6, c: int = 3):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(n, c, generator=g, dtype=torch.float64)
    if kind in ("cross_entropy", "nll"):
        return out, torch.randint(0, c, (n,), generator=g)
    if kind == "bce_with_logits":
        return out, torch.randint(0, 2, (n, c), generator=g).double()
    return out, torch.randn(n, c, generator=g, dtype=torch.float64)


MODULES = {"cross_entropy": nn.CrossEntropyLoss, "nll": nn.NLLLoss, "mse": nn.MSELoss,
           "bce_with_logits": nn.BCEWithLogitsLoss}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(MODULES))
def test_forms_agree_and_output_hessian_is_exact(name, reduction) -> None:
    out, t = outputs_and_targets(name)
    module = MODULES[name](reduction=reduction)
    forms = [as_loss("f", module), as_loss("f", name, reduction)]
    want = float(module(out, t))
    for loss in forms:
        assert loss.reduction == reduction and loss.name == name
        assert float(loss(out, t)) == pytest.approx(want, rel=1e-12)
        # the closed form against autograd, with a batch weight
        Hd = torch.autograd.functional.hessian(lambda o, f=loss: f(o.view_as(out), t) * 0.3, out.reshape(-1))
        R = torch.randn(out.shape[0], 2, out.shape[1], dtype=torch.float64)
        closed = loss.output_hessian(out, t, 0.3)
        assert closed is not None
        want_R = torch.stack([(Hd @ R[:, j].reshape(-1)).view_as(out) for j in range(2)], 1)
        torch.testing.assert_close(closed(R), want_R, rtol=1e-10, atol=1e-12)
        # per-sample losses: the loss of each sample as a batch of one
        per = loss.per_sample(out, t)
        one = torch.stack([loss(out[i:i + 1], t[i:i + 1]) for i in range(out.shape[0])])
        torch.testing.assert_close(per, one, rtol=1e-12, atol=0)


def test_functionals_callables_and_probe() -> None:
    out, t = outputs_and_targets("cross_entropy")
    assert as_loss("f", F.cross_entropy).reduction == "mean"
    assert as_loss("f", F.cross_entropy, "sum").reduction == "sum"
    assert as_loss("f", "ce").name == "cross_entropy"
    probe = lambda: (out, t)
    summed = as_loss("f", lambda o, y: F.cross_entropy(o, y, reduction="sum"))
    assert summed.reduction is None and summed.resolved("f", probe).reduction == "sum"
    mean = as_loss("f", lambda o, y: F.cross_entropy(o, y))
    assert mean.resolved("f", probe).reduction == "mean"
    assert as_loss("f", lambda o, y: F.cross_entropy(o, y), "sum").reduction == "sum"  # stated wins
    odd = as_loss("f", lambda o, y: F.cross_entropy(o, y, reduction="sum") ** 0.5)
    with pytest.raises(ValueError, match="f: expected loss_fn to average .* pass reduction='mean'"):
        odd.resolved("f", probe)


def test_closed_forms_declined_where_they_do_not_hold() -> None:
    out, t = outputs_and_targets("cross_entropy")
    assert as_loss("f", nn.CrossEntropyLoss(label_smoothing=0.1)).name is None
    assert as_loss("f", nn.CrossEntropyLoss(weight=torch.ones(3))).name is None
    ce = as_loss("f", "ce", "sum")
    assert ce.output_hessian(out, torch.softmax(out, 1), 1.0) is None  # soft labels
    ignored = t.clone()
    ignored[0] = -100  # ignore_index: that row has no curvature; autograd handles it
    assert ce.output_hessian(out, ignored, 1.0) is None


def test_refusals() -> None:
    with pytest.raises(ValueError, match="f: expected a loss module with reduction 'mean' or 'sum'"):
        as_loss("f", nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="f: expected reduction to agree with the loss module's"):
        as_loss("f", nn.MSELoss(reduction="sum"), "mean")
    with pytest.raises(ValueError, match="f: expected loss to be one of"):
        as_loss("f", "hinge")
    with pytest.raises(TypeError, match="f: expected loss to be an nn.Module loss"):
        as_loss("f", 3)
    with pytest.raises(ValueError, match="hbk.loss: expected the loss to return a scalar"):
        as_loss("f", lambda o, y: o, "mean")(torch.ones(2, 2), torch.ones(2))
