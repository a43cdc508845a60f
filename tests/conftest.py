"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None):
    """assert_close with a tolerance relative to the result's scale.

    float32 GEMMs with long reductions differ from another summation order by about
    sqrt(p) * eps * |a||b|, so entries are compared against the largest magnitude.
    """
    if rtol is None:
        rtol = 1e-4 if expected.dtype == torch.float32 else 1e-10
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny problems: on a loaded 2-core machine, OpenMP
    barriers between many small ops stall (test files took 80-150 s at 2 threads, ~6 s at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
