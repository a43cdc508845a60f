"""The samples of a per-sample call: inputs with a leading sample dimension, and how to call the model.

Accepted ``inputs``:

* a tensor ``(n, ...)``: ``model(inputs[s:e])``;
* a tuple (or list) whose tensors all have ``n`` rows: ``model(*inputs[s:e])`` (non-tensor
  entries are passed unchanged to every block);
* a dict of such tensors: ``model(**inputs[s:e])`` (a Hugging Face style batch);
* with ``forward(model, inputs) -> outputs``, any of the three is passed to ``forward`` instead
  (e.g. ``lambda m, b: m(**b).logits``).

Tensors are used as they are (no dtype cast: a model may cast raw ``uint8`` pixels itself); they
must be on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checks import describe, fail

__all__ = ["Forward", "SampleInputs"]

Forward = Callable[[nn.Module, Any], Any]


def _leaves(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [(f"inputs[{k!r}]", v) for k, v in obj.items()]
    return [(f"inputs[{i}]", v) for i, v in enumerate(obj)]


class SampleInputs:
    """Inputs of ``n`` samples in one of the accepted forms, sliced into sample blocks.

    Args:
        fn: the public function, for error messages.
        inputs: a tensor, tuple/list or dict (see the module docstring).
        device: the model's device; every tensor must be on it.
        forward: optional ``forward(model, inputs) -> outputs``.

    Attributes:
        n: the number of samples.
        kind: "tensor", "tuple" or "dict".
    """

    def __init__(self, fn: str, inputs: Any, device: torch.device,
                 forward: Forward | None = None) -> None:
        if forward is not None and not callable(forward):
            fail(fn, "forward to be a callable forward(model, inputs) -> outputs", forward,
                 TypeError)
        self.fn = fn
        self.forward = forward
        self.data = inputs
        if isinstance(inputs, torch.Tensor):
            self.kind = "tensor"
            named = [("inputs", inputs)]
        elif isinstance(inputs, (tuple, list)):
            self.kind = "tuple"
            named = _leaves(inputs)
        elif isinstance(inputs, dict):
            self.kind = "dict"
            named = _leaves(inputs)
        else:
            fail(fn, "inputs to be a torch.Tensor, a tuple or a dict of tensors", inputs, TypeError)
        tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor)]
        if not tensors:
            fail(fn, "inputs with at least one tensor", describe(inputs), TypeError, raw=True)
        first_name, first = tensors[0]
        if first.dim() < 1 or first.shape[0] < 1:
            fail(fn, f"{first_name} of shape (n, ...) with n >= 1", f"{tuple(first.shape)}",
                 raw=True)
        self.n = int(first.shape[0])
        for name, t in tensors:
            if t.dim() < 1 or t.shape[0] != self.n:
                fail(fn, f"every input tensor to have the sample dimension first ({self.n}, ...)",
                     f"{name} of shape {tuple(t.shape)}", raw=True)
            if t.device != device:
                fail(fn, f"inputs on the model's device {device}", f"{name} on {t.device}",
                     TypeError, raw=True)

    # ----------------------------------------------------------------- slicing
    def slice(self, start: int, stop: int) -> Any:
        """The inputs of samples ``[start, stop)``, in the same form."""
        return self._map(lambda t: t[start:stop])

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        x = self.data
        if self.kind == "tensor":
            return f(x)
        if self.kind == "dict":
            return {k: f(v) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        return type(x)(f(v) if isinstance(v, torch.Tensor) else v for v in x)

    def in_dims(self) -> Any:
        """``vmap`` in_dims over one block in this form: 0 for the tensors, None otherwise."""
        if self.kind == "tensor":
            return 0
        if self.kind == "dict":
            return {k: 0 if isinstance(v, torch.Tensor) else None for k, v in self.data.items()}
        return type(self.data)(0 if isinstance(v, torch.Tensor) else None for v in self.data)

    # ----------------------------------------------------------------- calls
    def call(self, model: nn.Module, part: Any) -> Any:
        """The model's outputs on one block (``forward`` if given)."""
        if self.forward is not None:
            return self.forward(model, part)
        if self.kind == "tensor":
            return model(part)
        if self.kind == "dict":
            return model(**part)
        return model(*part)

    @staticmethod
    def unsqueeze(part: Any) -> Any:
        """One sample (inside vmap: no sample dimension) as a block of one."""
        if isinstance(part, torch.Tensor):
            return part.unsqueeze(0)
        if isinstance(part, dict):
            return {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v
                    for k, v in part.items()}
        return type(part)(v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for v in part)
