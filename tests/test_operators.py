"""The LinearOperator base: validation, counting, dtype round trip, output checks, scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hbkernels as hbk
from hbkernels.operators import LinearOperator, MatrixOperator, as_operator


class Diag(LinearOperator):
    name = "Diag"

    def __init__(self, d: torch.Tensor, bad: str | None = None) -> None:
        super().__init__(d.numel(), d.dtype, d.device)
        self.d, self.bad = d, bad

    def _matmat(self, V):
        out = self.d[:, None] * V
        if self.bad == "shape":
            return out[:, :1]
        if self.bad == "dtype":
            return out.float()
        if self.bad == "nan":
            return out * float("nan")
        return out


def test_products_shapes_dtypes_and_counting() -> None:
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    op = Diag(d)
    assert op.shape == (3, 3) and op.dim == 3
    v = torch.ones(3, dtype=torch.float32)
    out = op @ v
    assert out.dtype == torch.float32 and out.shape == (3,) and out.tolist() == [1.0, 2.0, 3.0]
    V = torch.ones(3, 4, dtype=torch.float64)
    assert torch.equal(op.matvec(V), d[:, None].expand(3, 4))
    assert op.num_matvecs == 5
    assert op.matvec(torch.ones(3, 0, dtype=torch.float64)).shape == (3, 0)
    assert torch.equal(op.dense(block_size=2), torch.diag(d))


def test_input_and_output_checks() -> None:
    op = Diag(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="hbk.Diag: expected a torch.Tensor"):
        op.matvec([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="hbk.Diag: expected a floating-point vector"):
        op.matvec(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"hbk.Diag: expected shape \(3,\) or \(3, b\)"):
        op.matvec(torch.ones(4))
    for bad, exc, msg in (("shape", RuntimeError, r"a product of shape \(3, 2\)"),
                          ("dtype", RuntimeError, "dtype torch.float64"),
                          ("nan", FloatingPointError, "finite products")):
        with pytest.raises(exc, match=msg):
            Diag(torch.ones(3, dtype=torch.float64), bad).matvec(torch.ones(3, 2, dtype=torch.float64))


def test_to_scipy_and_matrix_operator() -> None:
    from scipy.sparse.linalg import eigsh

    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = A + A.T
    op = hbk.MatrixOperator(A)
    lin = op.to_scipy()
    x = np.random.RandomState(0).randn(8)
    np.testing.assert_allclose(lin @ x, A.numpy() @ x, rtol=1e-12)
    np.testing.assert_allclose(lin.matmat(np.eye(8)), A.numpy(), rtol=1e-12)
    w = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(w), torch.linalg.eigvalsh(A)[-2:].numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="hbk.MatrixOperator: expected a square matrix"):
        MatrixOperator(torch.ones(2, 3))
    with pytest.raises(TypeError, match="hbk.MatrixOperator: expected float32 or float64"):
        MatrixOperator(torch.ones(2, 2, dtype=torch.int32))


def test_as_operator_wraps_and_checks_foreign_operators() -> None:
    A = torch.eye(3, dtype=torch.float64)
    assert isinstance(as_operator("f", A), MatrixOperator)
    op = Diag(torch.ones(3, dtype=torch.float64))
    assert as_operator("f", op) is op

    class Foreign:
        dim = 3

        def matvec(self, V):
            return V[:, :1]  # wrong shape for blocks

    wrapped = as_operator("f", Foreign())
    assert isinstance(wrapped, LinearOperator) and wrapped.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"hbk.Foreign: expected a product of shape \(3, 2\)"):
        wrapped.matvec(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="f: expected an operator with .dim and .matvec"):
        as_operator("f", object())
