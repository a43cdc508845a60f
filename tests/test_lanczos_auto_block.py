"""block_size="auto" of hbk.lanczos: the rule, and no trial products on CPU."""

from __future__ import annotations

import pytest
import torch

import hbkernels as hbk
from hbkernels.lanczos import AUTO_BLOCK, choose_block_size

pytestmark = pytest.mark.usefixtures("one_thread")


def test_choose_block_size_rule() -> None:
    assert choose_block_size(1.0, 0.5 * AUTO_BLOCK) == AUTO_BLOCK  # half the cost per vector
    assert choose_block_size(1.0, 0.8 * AUTO_BLOCK) == 1  # 0.8x: not worth a block
    assert choose_block_size(1.0, 1.5 * AUTO_BLOCK) == 1  # CPU-like: a block costs more


def test_auto_block_on_cpu_is_one_without_trial() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64),
                   torch.rand(97, generator=g, dtype=torch.float64)])
    calls = []

    def mv(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return d[:, None] * x if x.dim() == 2 else d * x

    res = hbk.lanczos(mv, 100, 3, tol=1e-8, seed=0, block_size="auto")
    assert res.block_size == 1 and res.profile["block_rule"] == "cpu"
    assert len(calls) == res.num_matvecs and all(len(s) == 1 for s in calls)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64))


def test_auto_block_rejects_other_strings() -> None:
    with pytest.raises(TypeError, match="hbk.lanczos: expected block_size to be an int"):
        hbk.lanczos(lambda x: x, 10, 1, block_size="big")
