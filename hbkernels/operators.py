"""The linear-operator base every curvature operator shares, and ``MatrixOperator``.

A subclass implements ``_matmat(V)`` for a ``(dim, b)`` block in the operator's dtype and
device; the base validates the input, counts products, checks the output (shape, dtype,
finiteness: a non-finite product is an error naming the operator, never a silent NaN in a
spectrum), converts back to the caller's dtype, and offers ``@``, ``to_scipy()`` and
``dense()``.

>>> import torch
>>> A = MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
>>> (A @ torch.ones(3, dtype=torch.float64)).tolist()
[1.0, 2.0, 3.0]
>>> A.num_matvecs
1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .checks import FLOATS, fail

__all__ = ["LinearOperator", "MatrixOperator", "as_operator"]


class LinearOperator:
    """A symmetric ``(dim, dim)`` operator on flat parameter vectors.

    Attributes:
        dim: the size ``p``.
        dtype: dtype of the products (float32/float64).
        device: device of the products.
        num_matvecs: products so far (a block of ``b`` vectors counts ``b``).
    """

    name = "LinearOperator"

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``A V`` for ``V`` of shape ``(dim, b)`` in the operator's dtype and device."""
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(dim,)`` or ``(dim, b)`` (a block), any float dtype.

        Returns:
            Same shape, dtype and device as ``v`` (computed in the operator's dtype).
        """
        fn = f"hbk.{self.name}"
        if not isinstance(v, torch.Tensor):
            fail(fn, "a torch.Tensor", v, TypeError)
        if not v.is_floating_point():
            fail(fn, "a floating-point vector", v.dtype, TypeError, raw=True)
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            fail(fn, f"shape ({self.dim},) or ({self.dim}, b)", f"shape {tuple(v.shape)}", raw=True)
        V = (v[:, None] if v.dim() == 1 else v).to(self.device, self.dtype)
        b = V.shape[1]
        if b == 0:
            return v.clone()
        out = self._matmat(V)
        if not isinstance(out, torch.Tensor) or out.shape != (self.dim, b) or out.dtype != self.dtype:
            got = f"shape {tuple(out.shape)}, dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            fail(fn, f"a product of shape ({self.dim}, {b}) and dtype {self.dtype}", got, RuntimeError, raw=True)
        if not bool(torch.isfinite(out).all()):
            fail(fn, "finite products", "a product with NaN or inf entries (non-finite loss, "
                 "parameters or data?)", FloatingPointError, raw=True)
        self.num_matvecs += b
        out = out.to(device=v.device, dtype=v.dtype)
        return out[:, 0] if v.dim() == 1 else out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 in and out) with the same products."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def mm(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            return self.matvec(t).double().cpu().numpy()

        def mv(x: np.ndarray) -> np.ndarray:
            return mm(np.asarray(x).reshape(self.dim))

        return ScipyOperator((self.dim, self.dim), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)

    def dense(self, block_size: int = 256) -> torch.Tensor:
        """The ``(dim, dim)`` matrix from products with identity blocks (small operators)."""
        cols = []
        for j0 in range(0, self.dim, block_size):
            j1 = min(self.dim, j0 + block_size)
            E = torch.zeros(self.dim, j1 - j0, dtype=self.dtype, device=self.device)
            E[torch.arange(j0, j1), torch.arange(j1 - j0)] = 1
            cols.append(self.matvec(E))
        return torch.cat(cols, dim=1)


class MatrixOperator(LinearOperator):
    """An explicit symmetric matrix as an operator (symmetry is the caller's responsibility).

    Args:
        matrix: ``(dim, dim)`` float32/float64 tensor.
    """

    name = "MatrixOperator"

    def __init__(self, matrix: torch.Tensor) -> None:
        fn = "hbk.MatrixOperator"
        if not isinstance(matrix, torch.Tensor):
            fail(fn, "a torch.Tensor", matrix, TypeError)
        if matrix.dtype not in FLOATS:
            fail(fn, "float32 or float64", matrix.dtype, TypeError, raw=True)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            fail(fn, "a square matrix", f"shape {tuple(matrix.shape)}", raw=True)
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class _ForeignOperator(LinearOperator):
    """Any object with ``dim`` and a block ``matvec``, behind the base's checks (a product of
    the wrong shape, e.g. ``(dim, 1)`` for a block, is an error, never broadcast)."""

    def __init__(self, op: Any) -> None:
        super().__init__(op.dim, getattr(op, "dtype", torch.float64), getattr(op, "device", "cpu"))
        self.op = op
        self.name = type(op).__name__

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matvec(V)
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != self.dtype:
            out = out.to(self.dtype)
        return out


def as_operator(fn: str, op: Any) -> LinearOperator:
    """A tensor as a :class:`MatrixOperator`; a :class:`LinearOperator` as it is; any other
    object with ``dim`` and ``matvec`` wrapped so that its products are checked."""
    if isinstance(op, torch.Tensor):
        return MatrixOperator(op)
    if isinstance(op, LinearOperator):
        return op
    if not hasattr(op, "dim") or not hasattr(op, "matvec") or isinstance(op.dim, bool) \
            or not isinstance(op.dim, int):
        fail(fn, "an operator with .dim and .matvec (HessianOperator, MatrixOperator, ...) or a "
             "square tensor", op, TypeError)
    return _ForeignOperator(op)
