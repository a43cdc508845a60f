"""The data of an operator: ``(X, y)``, a list or a ``DataLoader`` of batches, streamed.

Accepted forms of ``data``:

* ``(X, y)``: two tensors with the same number of rows: one batch, kept in memory;
* a re-iterable of batches (a list, a ``DataLoader``, any object whose ``__iter__`` starts
  over): iterated anew for every product, never materialised (``cache=True`` keeps the batches
  in memory when they fit ``cache_bytes``). One-shot iterators (generators) are refused: they
  cannot be iterated twice;
* each batch is ``(inputs..., targets)`` (a tuple or list: the last element is the target, the
  others the model's positional inputs) or a dict whose target is under one of
  ``"labels"``, ``"label"``, ``"targets"``, ``"target"``, ``"y"`` (the rest are passed as
  keyword arguments, ``model(**rest)``);
* ``forward(model, batch) -> (outputs, targets)`` replaces both rules for models that need
  their own call (``model(**batch).logits``, a second output, ...).

Floating tensors of a batch are moved to the operator's device and cast to its dtype, integer
tensors only moved. A shuffling ``DataLoader`` (a random sampler) is refused unless
``allow_shuffle=True``: with ``drop_last`` or random augmentations, every product would see
other data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import check_bool, check_int, describe, fail

__all__ = ["DEFAULT_CACHE_BYTES", "TARGET_KEYS", "Batch", "BatchSource", "ForwardCall"]

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class Batch:
    """One batch: ``inputs`` as the model takes them (a tuple of positional arguments, or a dict
    of keyword arguments), ``targets``, and the raw batch for a user ``forward``."""

    raw: Any
    inputs: tuple | dict | None
    targets: torch.Tensor | None


def _convert(obj: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively in tuples, lists, dicts) to ``device``; cast floating ones."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and dtype is not None:
            return obj.to(device=device, dtype=dtype)
        return obj.to(device) if device is not None else obj
    if isinstance(obj, dict):
        return {k: _convert(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(v, device, dtype) for v in obj)
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _is_random_loader(data: Any) -> bool:
    from torch.utils.data import (
        DataLoader,
        RandomSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    if not isinstance(data, DataLoader):
        return False
    samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
    return any(isinstance(s, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)) for s in samplers)


class ForwardCall(nn.Module):
    """``model`` plus the batch rule as one module: ``call(batch) -> (outputs, targets)``, so that
    ``torch.func.functional_call(call, {"model." + name: tensor}, (batch,))`` evaluates the
    model at other parameters for any batch form and any user ``forward``."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.user_forward = forward

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.user_forward is not None:
            out = self.user_forward(self.model, batch.raw)
            if not (isinstance(out, (tuple, list)) and len(out) == 2
                    and all(isinstance(t, torch.Tensor) for t in out)):
                fail("hbk: forward", "forward(model, batch) to return (outputs, targets) tensors",
                     type(out).__name__, TypeError)
            return out[0], out[1]
        if isinstance(batch.inputs, dict):
            return self.model(**batch.inputs), batch.targets
        return self.model(*batch.inputs), batch.targets


class BatchSource:
    """Batches of an operator's data, converted to its device and dtype, streamed each pass.

    Args:
        fn: the public function, for error messages.
        data: see the module docstring.
        forward: optional ``forward(model, batch) -> (outputs, targets)``.
        device, dtype: where floating batch tensors go (None: left as they are).
        cache: keep converted batches in memory (True), never (False) or when the data is
            ``(X, y)`` or a list of tensors that fit ``cache_bytes`` ("auto").
        allow_shuffle: accept a DataLoader with a random sampler.
    """

    def __init__(self, fn: str, data: Any, forward: Callable | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 cache: bool | str = "auto", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 allow_shuffle: bool = False) -> None:
        self.fn = fn
        self.forward = forward
        self.device = device
        self.dtype = dtype
        if forward is not None and not callable(forward):
            fail(fn, "forward to be a callable forward(model, batch) -> (outputs, targets)", forward, TypeError)
        if cache != "auto":
            check_bool(fn, "cache", cache)
        check_int(fn, "cache_bytes", cache_bytes, 0)
        check_bool(fn, "allow_shuffle", allow_shuffle)
        if self._is_pair(data):
            self._source: Iterable = [tuple(data)]
            in_memory = True
        else:
            if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
                fail(fn, "data to be (X, y), a list or DataLoader of batches", data, TypeError)
            if iter(data) is data:
                fail(fn, "re-iterable data (a list or a DataLoader; a one-shot iterator such as a "
                     "generator cannot be iterated once per product)", data, TypeError)
            if _is_random_loader(data) and not allow_shuffle:
                fail(fn, "a DataLoader that yields the same batches on every pass (shuffle=False): "
                     "a random sampler makes every Hessian product see other batches "
                     "(pass allow_shuffle=True to accept it)", "a shuffling DataLoader", raw=True)
            self._source = data
            in_memory = isinstance(data, (list, tuple))
        self._cached: list[Batch] | None = None
        want_cache = cache is True or (cache == "auto" and in_memory)
        if want_cache:
            batches = list(self._convert_all())
            size = sum(_nbytes(b.raw) for b in batches)
            if not batches:
                fail(fn, "at least one batch", "empty data", raw=True)
            if cache is True or size <= cache_bytes:
                self._cached = batches

    @staticmethod
    def _is_pair(data: Any) -> bool:
        return (isinstance(data, (tuple, list)) and len(data) == 2
                and all(isinstance(t, torch.Tensor) for t in data)
                and data[0].dim() > 0 and data[1].dim() > 0 and data[0].shape[0] == data[1].shape[0])

    # ----------------------------------------------------------------- iteration
    def _split(self, i: int, raw: Any) -> Batch:
        fn = self.fn
        if self.forward is not None:
            return Batch(raw, None, None)
        if isinstance(raw, dict):
            keys = [k for k in TARGET_KEYS if k in raw]
            if len(keys) != 1:
                fail(fn, f"dict batches with exactly one target key of {TARGET_KEYS} (or forward= "
                     "to say how to call the model)", f"batch {i} with keys {sorted(map(str, raw))}", raw=True)
            inputs = {k: v for k, v in raw.items() if k != keys[0]}
            targets = raw[keys[0]]
        elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
            inputs, targets = tuple(raw[:-1]), raw[-1]
        else:
            fail(fn, "each batch to be (inputs..., targets) or a dict with a target key (or "
                 "forward= to say how to call the model)", f"batch {i}: {describe(raw)}", TypeError, raw=True)
        if not isinstance(targets, torch.Tensor):
            fail(fn, f"the targets of batch {i} to be a tensor", targets, TypeError)
        return Batch(raw, inputs, targets)

    def _convert_all(self) -> Iterator[Batch]:
        for i, raw in enumerate(self._source):
            yield self._split(i, _convert(raw, self.device, self.dtype))

    def __iter__(self) -> Iterator[Batch]:
        """The batches, converted; a pass over the source (or the cache)."""
        if self._cached is not None:
            yield from self._cached
            return
        count = 0
        for b in self._convert_all():
            count += 1
            yield b
        if count == 0:
            fail(self.fn, "at least one batch", "empty data", raw=True)

    @property
    def in_memory(self) -> bool:
        """Whether the batches are held in memory (products can reuse per-batch work)."""
        return self._cached is not None

    def first(self) -> Batch:
        """The first batch (for probes)."""
        for b in self:
            return b
        fail(self.fn, "at least one batch", "empty data", raw=True)
