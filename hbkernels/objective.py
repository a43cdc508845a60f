"""The objective every curvature operator differentiates: the total loss over all samples.

``L(theta) = sum_b w_b loss(f(theta; batch_b))`` over the selected parameters ``theta`` (in
``model.parameters()`` order, each tensor flattened row-major), with ``w_b = n_b / N`` for a
"mean" loss and ``w_b = 1`` for a "sum" loss (:mod:`hbkernels.losses`), for any batch sizes
and any data form (:mod:`hbkernels.data`). The model is evaluated functionally
(``torch.func.functional_call``): it is never modified, its buffers are copies.

Before the first product the objective checks, as curvlinops does, that it is a function:
a model with active dropout or train-mode BatchNorm is refused, and two passes over the data
must give the same loss and gradient (which also catches random augmentations and random
forward code). ``check_deterministic=False`` turns the checks off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .checks import FLOATS, check_bool, fail
from .data import Batch, BatchSource, ForwardCall
from .losses import Loss, as_loss
from .params import trainable_parameters

__all__ = ["Objective", "check_model_is_deterministic", "select_params"]

_PREFIX = "model."


def select_params(fn: str, model: nn.Module, params: Any) -> list[str]:
    """Names (in ``model.parameters()`` order) of the trainable parameters selected by
    ``params``: None (all), a predicate on names, or an iterable of the model's parameters."""
    trainable = {id(p) for p in trainable_parameters(model)}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trainable]
    if params is None:
        names = [n for n, _ in named]
    elif callable(params) and not isinstance(params, nn.Parameter):
        names = [n for n, _ in named if params(n)]
    else:
        try:
            wanted = {id(p) for p in params}
        except TypeError:
            fail(fn, "params to be None, a name predicate or an iterable of parameters", params, TypeError)
        names = [n for n, p in named if id(p) in wanted]
        if len(names) != len(wanted):
            fail(fn, "params to be trainable parameters of model",
                 f"{len(wanted) - len(names)} tensor(s) that are not", raw=True)
    if not names:
        fail(fn, "params to select at least one trainable parameter", "none", raw=True)
    return names


def check_model_is_deterministic(fn: str, model: nn.Module) -> None:
    """Refuse a model whose forward is random or depends on the batching (train mode)."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            fail(fn, "a deterministic model (every product must differentiate the same function)",
                 f"active {type(m).__name__} {name!r} (model in train mode); call "
                 "model.eval(), or pass check_deterministic=False to differentiate random draws", raw=True)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            fail(fn, "a model whose outputs do not depend on the batching",
                 f"train-mode {type(m).__name__} {name!r} (it normalises with batch statistics); call "
                 "model.eval(), or pass check_deterministic=False to keep batch statistics", raw=True)


def _batch_size(targets: torch.Tensor) -> int:
    return int(targets.shape[0]) if targets.dim() > 0 else 1


class Objective:
    """The total (or mean) loss of a model over its data, as a function of selected parameters.

    Args:
        fn: the public function, for error messages.
        model: any ``nn.Module``; not modified.
        loss: an ``nn.Module`` loss, a registry name, or a callable (:func:`hbkernels.losses.as_loss`).
        data: ``(X, y)``, a list or a DataLoader of batches, tuple or dict batches
            (:mod:`hbkernels.data`).
        params: None (all trainable), a name predicate, or an iterable of parameters.
        forward: optional ``forward(model, batch) -> (outputs, targets)``.
        dtype: float32/float64; a different dtype from the model's works on a cast copy.
        reduction: "mean"/"sum" for a callable loss (probed once when not given).
        check_deterministic: refuse random models and data (see the module docstring).
        allow_shuffle: accept a shuffling DataLoader.
        cache: keep the converted batches in memory ("auto": when the data already is).

    Attributes:
        names, shapes, numels, dim: the selected parameters and their total size ``p``.
        dtype, device: of the parameters (and of the products).
        loss: the :class:`~hbkernels.losses.Loss` with its reduction.
        num_samples: ``N``, the number of targets over all batches.
        data: the :class:`~hbkernels.data.BatchSource`.
    """

    def __init__(self, fn: str, model: nn.Module, loss: Any, data: Any, *, params: Any = None,
                 forward: Callable | None = None, dtype: torch.dtype | None = None,
                 reduction: str | None = None, check_deterministic: bool = True,
                 allow_shuffle: bool = False, cache: bool | str = "auto") -> None:
        if not isinstance(model, nn.Module):
            fail(fn, "model to be a torch.nn.Module", model, TypeError)
        check_bool(fn, "check_deterministic", check_deterministic)
        names = select_params(fn, model, params)
        named = dict(model.named_parameters())
        model_dtype = named[names[0]].dtype
        dtype = model_dtype if dtype is None else dtype
        if dtype not in FLOATS:
            fail(fn, "dtype float32 or float64", dtype, TypeError, raw=True)
        if check_deterministic:
            check_model_is_deterministic(fn, model)
        if dtype != model_dtype or any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
            model = copy.deepcopy(model).to(dtype)
            named = dict(model.named_parameters())
        self.fn = fn
        self.model = model
        self.call = ForwardCall(model, forward)
        self.names = names
        self.dtype = dtype
        self.device = named[names[0]].device
        self.shapes = [named[n].shape for n in names]
        self.numels = [named[n].numel() for n in names]
        self.dim = sum(self.numels)
        self.params = {n: named[n].detach() for n in names}
        # Frozen parameters and buffers enter as constants; buffers are copies, so a forward
        # that updates them in place (train-mode BatchNorm) never changes the user's model.
        self._frozen = {_PREFIX + n: p.detach() for n, p in model.named_parameters() if n not in self.params}
        self._frozen.update({_PREFIX + n: b.detach().clone() for n, b in model.named_buffers()})
        self.data = BatchSource(fn, data, forward, self.device, dtype, cache=cache,
                                allow_shuffle=allow_shuffle)
        self.loss: Loss = as_loss(fn, loss, reduction)
        if self.loss.reduction is None:
            self.loss = self.loss.resolved(fn, self._probe)
        self.num_samples = 0
        value, grad = self._value_and_grad(count=True)
        if check_deterministic:
            self._check_repeatable(value, grad)
        self.value0, self.grad0 = value, grad

    # ----------------------------------------------------------------- evaluation
    def outputs(self, pdict: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, targets)`` of one batch at parameters ``pdict`` ({name: tensor} over the
        selected names; the others keep their values)."""
        full = {**self._frozen, **{_PREFIX + n: t for n, t in pdict.items()}}
        out, targets = functional_call(self.call, full, (batch,))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            fail(self.fn, "the model to return a floating-point tensor (or forward= to extract it)",
                 out, TypeError)
        return out, targets

    def weight(self, targets: torch.Tensor) -> float:
        """``w_b`` of a batch with these targets."""
        return self.loss.batch_weight(_batch_size(targets), self.num_samples)

    def batch_loss(self, pdict: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """``w_b loss(batch)``: one batch's share of the objective (a scalar with grad)."""
        out, targets = self.outputs(pdict, batch)
        return self.loss(out, targets) * self.weight(targets)

    def batches(self) -> Iterator[Batch]:
        """One pass over the data."""
        return iter(self.data)

    def value(self) -> float:
        """``L`` at the current parameters."""
        with torch.no_grad():
            return float(sum(float(self.batch_loss(self.params, b)) for b in self.batches()))

    def gradient(self) -> torch.Tensor:
        """``grad L`` as a ``(p,)`` tensor."""
        return self._value_and_grad()[1]

    # ----------------------------------------------------------------- flat <-> per-parameter
    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(b, p)`` rows as ``{name: (b, *shape)}`` views."""
        b = rows.shape[0]
        parts = torch.split(rows, self.numels, dim=1)
        return {n: t.reshape(b, *s) for n, t, s in zip(self.names, parts, self.shapes)}

    def join(self, parts: list[torch.Tensor], b: int) -> torch.Tensor:
        """Per-parameter ``(b, *shape)`` tensors (names order) as ``(b, p)`` rows."""
        return torch.cat([t.reshape(b, -1) for t in parts], dim=1)

    # ----------------------------------------------------------------- set-up passes
    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out, targets = self.outputs(self.params, self.data.first())
        return out, targets

    def _value_and_grad(self, count: bool = False) -> tuple[float, torch.Tensor]:
        """One pass: ``L`` and ``grad L``; with ``count``, also sets ``num_samples``.

        Batch losses are accumulated unnormalised (times ``n_b`` for a mean loss) and divided
        by ``N`` at the end, so one pass suffices before ``N`` is known."""
        mean = self.loss.reduction == "mean"
        total, n_total = 0.0, 0
        grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for i, batch in enumerate(self.batches()):
            p = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
            with torch.enable_grad():
                out, targets = self.outputs(p, batch)
                self._check_targets(i, out, targets)
                nb = _batch_size(targets)
                value = self.loss(out, targets) * (nb if mean else 1)
                gs = torch.autograd.grad(value, list(p.values()), allow_unused=True)
            grad += torch.cat([torch.zeros(t.numel(), dtype=self.dtype, device=self.device)
                               if g is None else g.reshape(-1) for g, t in zip(gs, p.values())])
            total += float(value.detach())
            n_total += nb
        if count:
            self.num_samples = n_total
        scale = 1.0 / n_total if mean else 1.0
        return total * scale, grad.mul_(scale)

    def _check_targets(self, i: int, out: torch.Tensor, targets: torch.Tensor) -> None:
        if out.shape[0] != _batch_size(targets) and targets.dim() > 0:
            fail(self.fn, f"outputs and targets of batch {i} with the same number of rows",
                 f"{tuple(out.shape)} and {tuple(targets.shape)}", raw=True)
        if self.loss.name in ("cross_entropy", "nll") and self.loss.reduction == "mean" \
                and not targets.is_floating_point() and bool((targets < 0).any()):
            fail(self.fn, "class targets >= 0 (a mean over ignored targets, ignore_index, is not a "
                 "mean over samples; use reduction='sum' and scale)", f"negative targets in batch {i}", raw=True)

    def _check_repeatable(self, value: float, grad: torch.Tensor) -> None:
        value2, grad2 = self._value_and_grad()
        rtol = 1e-4 if self.dtype == torch.float32 else 1e-9
        scale = float(grad.abs().max()) if grad.numel() else 0.0
        same_value = abs(value2 - value) <= rtol * max(abs(value), 1e-30)
        if not same_value or not torch.allclose(grad2, grad, rtol=rtol, atol=rtol * max(scale, 1e-30)):
            fail(self.fn, "a deterministic objective (two passes over the data gave the same loss "
                 "and gradient)", f"losses {value:.8g} and {value2:.8g}: the model or the data is "
                 "random (dropout in a custom forward, random augmentation, a shuffling or "
                 "drop_last loader); make it deterministic or pass check_deterministic=False", raw=True)
