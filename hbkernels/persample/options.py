"""The one keyword-only option set of every per-sample function, validated once.

``labels``: ``"pred"`` (the model's own prediction: argmax of the outputs, the paper's
reinforcing gradient; for BCE, ``outputs > 0``), ``"true"`` (``targets=`` required) or an
explicit tensor with a leading sample dimension. ``loss``: a registry name, an ``nn.Module``
loss or a callable (:func:`hbkernels.losses.as_loss`); each sample's gradient is that of its own
loss, a batch of one (:meth:`hbkernels.losses.Loss.per_sample`), whatever the reduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import TypedDict

from ..checks import check_bool, check_choice, check_int, describe, fail
from ..losses import Loss, as_loss
from .inputs import Forward

__all__ = ["DEFAULT_MEMORY_BUDGET", "STRATEGIES", "Options", "PerSampleOptions", "parse_options"]

DEFAULT_MEMORY_BUDGET = 512 * 2**20
"""Default working-memory budget per call, in bytes (outputs not included)."""

STRATEGIES = ("auto", "ghost", "materialise")
_CLASS_LOSSES = ("cross_entropy", "nll", "mse")


class PerSampleOptions(TypedDict, total=False):
    """The keyword-only options of every per-sample function.

    Attributes:
        labels: ``"pred"`` (default), ``"true"`` or a tensor with one row per sample.
        targets: the true labels for ``labels="true"``.
        loss: a registry name (default ``"ce"``), an ``nn.Module`` loss or a callable.
        reduction: ``"mean"``/``"sum"`` of a callable loss (only the empirical Fisher uses it).
        forward: ``forward(model, inputs) -> outputs``.
        block_size: samples per block (default: from ``memory_budget``).
        memory_budget: working-memory bytes (default 512 MiB; outputs not counted).
        strategy: ``"auto"``, ``"ghost"`` or ``"materialise"`` for every factor pair.
        quiet: no progress bar (default True).
        check_deterministic: refuse active dropout (default True).
    """

    labels: str | torch.Tensor
    targets: torch.Tensor | None
    loss: Any
    reduction: str | None
    forward: Forward | None
    block_size: int | None
    memory_budget: int | None
    strategy: str
    quiet: bool
    check_deterministic: bool


_OPTION_NAMES = tuple(PerSampleOptions.__annotations__)


@dataclass
class Options:
    """Validated options (see :func:`parse_options`)."""

    labels: str | torch.Tensor
    targets: torch.Tensor | None
    loss: Loss
    forward: Forward | None
    block_size: int | None
    memory_budget: int
    strategy: str
    quiet: bool
    check_deterministic: bool


def parse_options(fn: str, options: dict[str, Any]) -> Options:
    """Check the options that need no model; labels are checked against the samples later."""
    unknown = [k for k in options if k not in _OPTION_NAMES]
    if unknown:
        fail(fn, f"options among {_OPTION_NAMES}", f"{unknown[0]!r}", TypeError, raw=True)
    return _parse(fn, **options)


def _parse(fn: str, *, labels: Any = "pred", targets: Any = None, loss: Any = "ce",
           reduction: str | None = None, forward: Forward | None = None,
           block_size: Any = None, memory_budget: Any = None, strategy: Any = "auto",
           quiet: Any = True, check_deterministic: Any = True) -> Options:
    if isinstance(labels, str):
        if labels not in ("pred", "true"):
            fail(fn, "labels to be 'pred', 'true' or a label tensor", labels)
        if labels == "true" and targets is None:
            fail(fn, "targets (the true labels, one row per sample) with labels='true'", None)
    elif not isinstance(labels, torch.Tensor):
        fail(fn, "labels to be 'pred', 'true' or a label tensor", labels, TypeError)
    if targets is not None and not isinstance(targets, torch.Tensor):
        fail(fn, "targets to be a torch.Tensor", targets, TypeError)
    if block_size is not None:
        check_int(fn, "block_size", block_size, 1)
    if memory_budget is not None:
        check_int(fn, "memory_budget", memory_budget, 1)
    check_choice(fn, "strategy", strategy, STRATEGIES)
    check_bool(fn, "check_deterministic", check_deterministic)
    return Options(labels, targets, as_loss(fn, loss, reduction), forward, block_size,
                   DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
                   strategy, bool(quiet), check_deterministic)


def given_targets(fn: str, opts: Options, n: int, device: torch.device) -> torch.Tensor | None:
    """The explicit targets (``labels`` tensor or ``targets`` for "true") on ``device``, or None
    for ``labels="pred"``; integer labels become int64."""
    if isinstance(opts.labels, str):
        if opts.labels == "pred":
            return None
        given, name = opts.targets, "targets"
    else:
        given, name = opts.labels, "labels"
    if given.dtype == torch.bool or given.dtype.is_complex:
        fail(fn, f"{name} to be an integer (class labels) or floating tensor", given.dtype,
             TypeError, raw=True)
    if given.dim() < 1 or given.shape[0] != n:
        fail(fn, f"{name} of shape ({n},) (one row per sample)", f"{tuple(given.shape)}",
             raw=True)
    name_ = opts.loss.name
    if name_ in ("cross_entropy", "nll") and given.is_floating_point() and given.dim() == 1:
        fail(fn, f"{name} to be an integer tensor (class labels) for loss {name_!r}", given.dtype,
             TypeError, raw=True)
    if given.is_floating_point():
        return given.to(device)
    return given.to(device=device, dtype=torch.long)


def check_targets_against_outputs(fn: str, opts: Options, y: torch.Tensor,
                                  out: torch.Tensor) -> None:
    """Class labels of a registry loss must index the outputs' classes."""
    if opts.loss.name in _CLASS_LOSSES and not y.is_floating_point() and out.dim() >= 2:
        c = out.shape[1]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            name = "labels" if isinstance(opts.labels, torch.Tensor) else "targets"
            fail(fn, f"{name} in [0, {c})", f"values in [{lo}, {hi}]", raw=True)


def predicted_targets(fn: str, loss: Loss, out: torch.Tensor) -> torch.Tensor:
    """``labels="pred"``: the model's own prediction as targets of ``loss``."""
    if loss.name == "bce_with_logits":
        return (out.detach() > 0).to(out.dtype)
    if out.dim() != 2:
        fail(fn, "outputs of shape (n, C) for labels='pred' (the argmax over classes)",
             describe(out), raw=True)
    return out.detach().argmax(1)
