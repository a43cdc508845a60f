"""Argument checks with one message format: ``"<public name>: expected <what>, got <actual>"``.

Every public function validates its arguments through these helpers before any work starts,
so an error always names the function, the argument, what was expected and what was given.
ValueError is raised for bad values, TypeError for bad types, dtypes and devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_seed",
    "check_tensor",
    "check_that",
    "describe",
    "fail",
]

FLOATS = (torch.float32, torch.float64)


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
    if isinstance(x, (str, bool, int, float)) or x is None:
        return repr(x)
    return type(x).__name__


def fail(fn: str, what: str, got: Any, exc: type[Exception] = ValueError, raw: bool = False):
    """Raise ``exc("<fn>: expected <what>, got <got>")``; ``raw`` uses ``got`` as text."""
    raise exc(f"{fn}: expected {what}, got {got if raw else describe(got)}")


def check_that(cond: Any, fn: str, what: str, got: Any, exc: type[Exception] = ValueError):
    """:func:`fail` unless ``cond``; ``got`` is text. ``cond`` may be a symbolic bool (shape
    relations inside fake kernels / torch.compile), so it goes through ``torch._check_with``.
    Skipped while dynamo traces the caller: the traced op's fake kernel checks again."""
    if cond is True:  # a plain bool (eager calls): no torch._check machinery
        return
    if torch.compiler.is_dynamo_compiling():
        return
    torch._check_with(exc, cond, lambda: f"{fn}: expected {what}, got {got}")


def check_bool(fn: str, name: str, value: Any) -> bool:
    """``value`` must be a real bool (not a string such as ``"False"``, not an int)."""
    if not isinstance(value, bool):
        fail(fn, f"{name} to be True or False", value, TypeError)
    return value


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        fail(fn, f"{name} to be one of {tuple(choices)}", value,
             TypeError if not isinstance(value, str) else ValueError)
    return value


def check_int(fn: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (bools refused) with ``lo <= value <= hi`` where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(fn, f"{name} to be an int", value, TypeError)
    if lo is not None and value < lo:
        fail(fn, f"{name} >= {lo}", value)
    if hi is not None and value > hi:
        fail(fn, f"{name} <= {hi}", value)
    return int(value)


def check_float(fn: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (int or float; bools refused) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(fn, f"{name} to be a real number", value, TypeError)
    value = float(value)
    if not math.isfinite(value):
        fail(fn, f"{name} to be finite", value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        fail(fn, f"{name} {'>' if lo_open else '>='} {lo}", value)
    if hi is not None and (value >= hi if hi_open else value > hi):
        fail(fn, f"{name} {'<' if hi_open else '<='} {hi}", value)
    return value


def check_tensor(fn: str, name: str, t: Any, dims: Sequence[int] | None = None,
                 floating: bool = False) -> torch.Tensor:
    """A tensor with one of ``dims`` dimensions (any if None), float32/float64 if ``floating``."""
    if not isinstance(t, torch.Tensor):
        fail(fn, f"{name} to be a torch.Tensor", t, TypeError)
    if floating and t.dtype not in FLOATS:
        fail(fn, f"{name} to be float32 or float64", t.dtype, TypeError, raw=True)
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        fail(fn, f"{name} to be {want}", f"shape {tuple(t.shape)}", raw=True)
    return t


def check_seed(fn: str, name: str, seed: Any) -> int | None:
    """None or a non-negative int (what ``torch.Generator.manual_seed`` accepts)."""
    if seed is None:
        return None
    return check_int(fn, name, seed, 0, 2**63 - 1)
