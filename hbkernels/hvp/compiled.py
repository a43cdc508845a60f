"""Compiled forward-over-reverse HVPs: ``torch.compile`` of ``jvp(grad L, v)`` per batch.

The function compiled is :class:`~hbkernels.hvp.forward.ForwardOverReverse`'s per-batch
product (``vmap`` over a block of ``b`` directions when ``b > 1``). One compiled function is
kept per operator and block size; dynamo guards it on the batch's shapes and dtypes, so a
new input shape (a short last batch) compiles once more. The first product of each
``(block size, batch shapes)`` pays the compilation; :attr:`CompiledHVP.compile_seconds`
reports those first products' wall time (compilation included).

Measured on CPU (1 thread, shared 2-core machine at load 8-11; ``bench/bench_speed.py
--compiled``, ``bench/results/bench_speed.md``): on LeNet-5 (n = 128) compiling took 147 s for a
product of 0.118 s (eager forward-over-reverse 0.146 s; the auto method is faster still); on
the transformer encoder (p = 2,996, n = 256) 237 s for a product of 0.10 s, 3x slower than
double backward's 0.034 s. A 30-HVP solve costs 240 s compiled against 1 s with the auto
method, so the ``auto`` rule never picks this method (``method="compiled"`` asks for it).
"""

from __future__ import annotations

import time

import torch

from ..checks import fail
from ..data import Batch
from .forward import ForwardOverReverse

__all__ = ["CompiledHVP", "compile_unavailable_reason"]


def compile_unavailable_reason() -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} without torch.compile"
    try:
        import torch._dynamo as dynamo
    except ImportError as e:  # pragma: no cover - broken installs only
        return f"torch._dynamo not importable ({e})"
    if not dynamo.is_dynamo_supported():
        import sys

        return f"torch.compile unsupported on Python {sys.version.split()[0]}"
    return None


def _signature(batch: Batch, b: int) -> tuple:
    """Block size, and shape and dtype of every tensor of the batch: one compile each."""
    def sig(x):
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return tuple((k, sig(v)) for k, v in x.items())
        if isinstance(x, (tuple, list)):
            return tuple(sig(v) for v in x)
        return type(x).__name__
    return (b, sig(batch.inputs), sig(batch.targets))


class CompiledHVP(ForwardOverReverse):
    """``H V`` by a ``torch.compile``d forward-over-reverse product.

    Attributes:
        compile_seconds: wall time of the first product of each new (block size, batch
            shapes), compilation included.
        num_compiles: how many such first products ran.

    Raises:
        RuntimeError: ``torch.compile`` is unavailable (old torch, unsupported Python), or
            compiling the product failed (e.g. no C++ compiler for the inductor backend).
    """

    name = "compiled"

    def __init__(self, objective, fn: str = "hbk.HessianOperator") -> None:
        super().__init__(objective)
        self._fn = fn
        why = compile_unavailable_reason()
        if why is not None:
            fail(fn, "torch.compile to be available for method='compiled'", why, RuntimeError,
                 raw=True)
        self._compiled = {}
        self._seen: set[tuple] = set()
        self.compile_seconds = 0.0
        self.num_compiles = 0

    def _batch_hvp(self, batch: Batch, tangents: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        f = self._compiled.get(b)
        if f is None:
            f = self._compiled[b] = torch.compile(super()._batch_hvp, dynamic=False)
        key = _signature(batch, b)
        if key in self._seen:
            return f(batch, tangents, b)
        from torch._dynamo.exc import BackendCompilerFailed

        t0 = time.perf_counter()
        try:
            out = f(batch, tangents, b)
        except BackendCompilerFailed as e:
            fail(self._fn, "torch.compile to compile the HVP for method='compiled'",
                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                 RuntimeError, raw=True)
        self._seen.add(key)
        self.compile_seconds += time.perf_counter() - t0
        self.num_compiles += 1
        return out
