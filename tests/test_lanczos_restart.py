"""Thick restarts on a basis wider than the driver's 2048-column rotation buffer."""

from __future__ import annotations

import pytest
import torch

import hbkernels as hbk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("block_size", [1, 2])
def test_restarts_with_chunked_rotation(block_size: int) -> None:
    dim, k = 5000, 5  # 3 column chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    d = torch.rand(dim, generator=g, dtype=torch.float64)
    d[:k] = torch.tensor([3.0, 2.5, 2.0, 1.8, 1.6], dtype=torch.float64)
    Qr, _ = torch.linalg.qr(torch.randn(dim, 8, generator=g, dtype=torch.float64))

    def mv(x: torch.Tensor) -> torch.Tensor:
        return d[:, None] * x if x.dim() == 2 else d * x

    res = hbk.lanczos(mv, dim, k, tol=1e-9, seed=1, ncv=12, block_size=block_size,
                      v0=Qr[:, :block_size])
    assert res.num_restarts >= 3 and res.all_converged
    torch.testing.assert_close(res.eigenvalues, d[:k], atol=1e-8, rtol=0)
    Y = res.eigenvectors
    torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    true_res = (mv(Y) - Y * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(res.residuals, true_res, atol=1e-12, rtol=1e-6)
    assert (true_res <= 1e-9 * 3.0 * 1.01).all()
