"""One loss registry: the reduction is stated (or probed once), never guessed.

Every entry point takes ``loss`` as

* an ``nn.Module`` loss (``nn.CrossEntropyLoss(reduction="sum")``, ...): its ``reduction`` is
  read (``"none"`` is refused);
* a name: ``"cross_entropy"`` (``"ce"``), ``"nll"``, ``"mse"``, ``"bce_with_logits"``
  (``"bce"``), with ``reduction="mean"`` unless stated;
* a functional of torch (``F.cross_entropy``, ``F.mse_loss``, ...): its default reduction
  (mean);
* any callable ``loss(outputs, targets) -> scalar`` with ``reduction="mean"|"sum"`` stated, or,
  when not stated, probed once on the first batch (the batch against the same batch twice:
  equal means mean, doubled means sum); a probe that cannot tell is an error naming the
  argument.

The objective of every operator is then the **total** loss over all samples
``L = sum_b w_b loss(model(X_b), y_b)`` with ``w_b = n_b / N`` for "mean" (the mean over all
samples, whatever the batch sizes) and ``w_b = 1`` for "sum".

``"mse"`` accepts targets of the outputs' shape (regression) or integer class labels ``(n,)``,
which are compared with their one-hot vectors (the paper's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import fail

__all__ = ["LOSS_NAMES", "REDUCTIONS", "Loss", "as_loss"]

REDUCTIONS = ("mean", "sum")
_ALIASES = {"ce": "cross_entropy", "cross_entropy": "cross_entropy", "nll": "nll", "mse": "mse",
            "bce": "bce_with_logits", "bce_with_logits": "bce_with_logits"}
LOSS_NAMES = tuple(sorted(_ALIASES))
_FUNCTIONALS = {F.cross_entropy: "cross_entropy", F.nll_loss: "nll", F.mse_loss: "mse",
                F.binary_cross_entropy_with_logits: "bce_with_logits"}
_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.NLLLoss: "nll", nn.MSELoss: "mse",
            nn.BCEWithLogitsLoss: "bce_with_logits"}


def _one_hot_like(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Integer class labels as one-hot rows of the outputs' dtype; other targets unchanged.
    (A comparison instead of F.one_hot, whose range check is not vmap-able.)"""
    if targets.is_floating_point() or targets.shape == outputs.shape:
        return targets.to(outputs.dtype)
    classes = torch.arange(outputs.shape[-1], device=outputs.device)
    return (classes == targets.unsqueeze(-1)).to(outputs.dtype)


def _per_sample_registry(name: str, reduction: str, outputs: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """``(n,)`` losses of each sample on its own: the loss of a batch of one (so MSE and BCE
    average, or add up, over the sample's C outputs as the reduction says)."""
    n = outputs.shape[0]
    per = _batch_registry(name, "none", outputs, targets)
    if per.dim() == 1:
        return per
    per = per.reshape(n, -1)
    return per.mean(1) if reduction == "mean" else per.sum(1)


@dataclass(frozen=True)
class Loss:
    """A loss with its reduction stated.

    Attributes:
        fn: the user's loss (or a registry function) ``fn(outputs, targets) -> scalar``.
        reduction: "mean" or "sum" (None only before :meth:`resolved` probed it).
        name: the registry name when the loss is a plain registry loss (closed forms apply),
            else None.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    reduction: str | None
    name: str | None = None

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch loss with the stated reduction (a scalar)."""
        out = self.fn(outputs, targets)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            fail("hbk.loss", "the loss to return a scalar tensor (a reduced loss)",
                 f"{tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__, raw=True)
        return out.reshape(())

    def batch_weight(self, batch_size: int, num_samples: int) -> float:
        """``w_b``: the weight of one batch's loss in the total objective."""
        return batch_size / num_samples if self.reduction == "mean" else 1.0

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(n,)``: each sample's own loss, as the loss of a batch of one (batch-of-one
        semantics, whatever the reduction: a mean over one sample is that sample's loss)."""
        if self.name is not None:
            return _per_sample_registry(self.name, self.reduction or "mean", outputs, targets)
        return torch.func.vmap(lambda o, t: self(o[None], t[None]))(outputs, targets)

    def output_hessian(self, outputs: torch.Tensor, targets: torch.Tensor,
                       weight: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Closed form of ``d^2 (weight * loss(outputs, targets)) / d outputs^2`` applied to
        directions ``R`` of shape ``(n, b, C)``, or None when no closed form is known.

        Args:
            outputs: ``(n, C)`` logits (detached).
            targets: the batch's targets.
            weight: the batch weight ``w_b``.
        """
        if self.name is None or outputs.dim() != 2:
            return None
        n, c = outputs.shape
        scale = weight / n if self.reduction == "mean" else weight
        if self.name == "cross_entropy":
            if targets.is_floating_point() or targets.dim() != 1 or bool((targets < 0).any()):
                return None  # soft labels, ignored targets: the autograd route is exact
            p = torch.softmax(outputs.detach(), dim=1)[:, None, :]
            return lambda R: (p * R - p * (R * p).sum(-1, keepdim=True)) * scale
        if self.name == "nll":
            return lambda R: torch.zeros_like(R)  # linear in the outputs
        if self.name == "mse":
            s = 2.0 * (scale / c if self.reduction == "mean" else scale)
            return lambda R: R * s
        s = torch.sigmoid(outputs.detach())[:, None, :]
        cs = scale / c if self.reduction == "mean" else scale
        return lambda R: R * (s * (1 - s)) * cs

    def resolved(self, fn_name: str, probe: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Loss:
        """This loss with its reduction known: probed on ``probe()`` = (outputs, targets) of
        one batch if it was not stated."""
        if self.reduction is not None:
            return self
        outputs, targets = probe()
        with torch.no_grad():
            once = float(self(outputs, targets))
            twice = float(self(torch.cat([outputs, outputs]), torch.cat([targets, targets])))
        tol = 1e-5 * max(abs(once), 1e-30)
        is_mean, is_sum = abs(twice - once) <= tol, abs(twice - 2 * once) <= tol
        if is_mean != is_sum:
            return Loss(self.fn, "mean" if is_mean else "sum", self.name)
        fail(fn_name, "loss_fn to average ('mean') or add up ('sum') per-sample losses, or "
             "reduction='mean'|'sum' stated", f"a callable whose reduction a probe could not tell "
             f"(loss {once:.6g} on the first batch, {twice:.6g} on it twice); pass "
             "reduction='mean' or reduction='sum'",
             raw=True)


def as_loss(fn_name: str, loss: object, reduction: str | None = None) -> Loss:
    """Normalise the ``loss`` argument of a public function (see the module docstring).

    Args:
        fn_name: the public function, for error messages.
        loss: an ``nn.Module`` loss, a registry name, a torch functional or a callable.
        reduction: "mean" or "sum"; required to agree with a module's own ``reduction``.

    Returns:
        A :class:`Loss`; its ``reduction`` is None only for a callable whose reduction was not
        stated (call :meth:`Loss.resolved` with a batch to probe it).
    """
    if isinstance(loss, Loss):
        return loss
    if reduction is not None and reduction not in REDUCTIONS:
        fail(fn_name, f"reduction to be one of {REDUCTIONS}", reduction)
    if isinstance(loss, str):
        name = _ALIASES.get(loss)
        if name is None:
            fail(fn_name, f"loss to be one of {LOSS_NAMES}, an nn.Module loss or a callable", loss)
        red = reduction or "mean"
        return Loss(lambda o, t, _n=name, _r=red: _batch_registry(_n, _r, o, t), red, name)
    if isinstance(loss, nn.Module):
        red = getattr(loss, "reduction", None)
        if red is None:
            return Loss(loss, reduction)  # a module without a reduction attribute: a callable
        if red not in REDUCTIONS:
            fail(fn_name, "a loss module with reduction 'mean' or 'sum' (per-sample losses are "
                 "handled by the per-sample functions)", f"reduction={red!r}", raw=True)
        if reduction is not None and reduction != red:
            fail(fn_name, f"reduction to agree with the loss module's ({red!r})", reduction)
        name = _MODULES.get(type(loss))
        if name is not None and not _is_plain(loss):
            name = None  # class weights, label smoothing, ...: no closed form, autograd is exact
        if name == "mse":
            return Loss(lambda o, t, _r=red: _batch_registry("mse", _r, o, t), red, name)
        return Loss(loss, red, name)
    if callable(loss):
        name = _FUNCTIONALS.get(loss)
        if name is not None:
            red = reduction or "mean"
            return Loss(lambda o, t, _n=name, _r=red: _batch_registry(_n, _r, o, t), red, name)
        return Loss(loss, reduction)
    fail(fn_name, f"loss to be an nn.Module loss, one of {LOSS_NAMES} or a callable", loss, TypeError)


def _is_plain(module: nn.Module) -> bool:
    """No class weights, no label smoothing, no pos_weight: the registry's closed forms hold."""
    if getattr(module, "weight", None) is not None or getattr(module, "pos_weight", None) is not None:
        return False
    return getattr(module, "label_smoothing", 0.0) == 0.0


def _batch_registry(name: str, reduction: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if name == "nll":
        return F.nll_loss(outputs, targets, reduction=reduction)
    if name == "mse":
        return F.mse_loss(outputs, _one_hot_like(outputs, targets), reduction=reduction)
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction=reduction)
