"""Data-parallel operators on torch.distributed.

Every rank holds a shard of the data and the same model. A Hessian-vector product is the
size-weighted sum of the ranks' local products (one all-reduce), so every rank sees the
identical product and can run the same deterministic Lanczos driver in lockstep (same seed or
v0): the eigenpairs come out identical on all ranks. Per-sample quantities are computed on the
local shard and gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .hessian import HessianOperator
from .lanczos import LanczosResult, lanczos
from .persample import gradient_alignment


def _require_initialized(fn: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{fn}: expected an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )


def shard(data: tuple[torch.Tensor, torch.Tensor], rank: int | None = None,
          world_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous slice of ``(X, y)`` that belongs to ``rank`` (sizes differ by at most 1).

    Args:
        data: ``(X, y)`` with the same first dimension.
        rank, world_size: default to the current process group's.
    """
    fn = "hbk.distributed.shard"
    if rank is None or world_size is None:
        _require_initialized(fn)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"{fn}: expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    X, y = data
    n = X.shape[0]
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return X[start:stop], y[start:stop]


class DistributedHessianOperator:
    """The Hessian of the mean loss over the union of all ranks' shards.

    Args:
        model, loss_fn: as for :class:`hbkernels.HessianOperator` (same model on every rank).
        local_data: this rank's ``(X, y)`` or batches (may be empty on no rank).
        group: the process group (default: the world).
        **kwargs: forwarded to :class:`hbkernels.HessianOperator` (params, method, dtype).

    Attributes:
        dim: ``p``; num_samples: total over ranks; num_matvecs: products on this rank.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, local_data: Any, group=None, **kwargs: Any):
        _require_initialized("hbk.DistributedHessianOperator")
        self.local = HessianOperator(model, loss_fn, local_data, **kwargs)
        self.group = group
        total = torch.tensor([float(self.local.num_samples)], dtype=torch.float64)
        dist.all_reduce(total, group=group)
        self.num_samples = int(total.item())
        self.weight = self.local.num_samples / self.num_samples
        self.dim = self.local.dim
        self.device = self.local.device

    @property
    def num_matvecs(self) -> int:
        return self.local.num_matvecs

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v`` of shape ``(p,)`` or ``(p, b)``; a collective: call on every rank."""
        out = self.local.matvec(v) * self.weight
        dist.all_reduce(out, group=self.group)
        return out

    __matmul__ = matvec


def distributed_hessian_eigs(model: nn.Module, loss_fn: Callable, local_data: Any, k: int,
                             which: str = "LA", tol: float = 1e-6, seed: int = 0, group=None,
                             **lanczos_kwargs: Any) -> LanczosResult:
    """Top-k Hessian eigenpairs over sharded data; returns the same result on every rank.

    The Lanczos start vector comes from ``seed`` (the same on every rank), so the drivers on all
    ranks take identical steps. Arguments as for :func:`hbkernels.hessian_eigs`.
    """
    op = DistributedHessianOperator(model, loss_fn, local_data, group=group)
    lanczos_kwargs.setdefault("device", op.device)
    return lanczos(op.matvec, op.dim, k, which=which, tol=tol, seed=seed, **lanczos_kwargs)


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor in rank order (n_r may differ)."""
    _require_initialized("hbk.distributed.gather_rows")
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64), group=group)
    longest = max(int(s) for s in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def distributed_gradient_alignment(model: nn.Module, local_inputs: torch.Tensor,
                                   vectors: torch.Tensor, group=None, **kwargs: Any) -> torch.Tensor:
    """:func:`hbkernels.gradient_alignment` on each rank's inputs, gathered in rank order."""
    return gather_rows(gradient_alignment(model, local_inputs, vectors, **kwargs), group=group)
