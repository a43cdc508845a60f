"""Data-parallel operators on torch.distributed.

Every rank holds a shard of the data and the same model. A Hessian-vector product is the
weighted sum of the ranks' local products (``n_r / N`` for a mean loss, 1 for a sum; one
all-reduce), on the :class:`~hbkernels.operators.LinearOperator` base, so every rank sees the
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

from .checks import check_int, fail
from .hessian import HessianOperator, eigs
from .lanczos import LanczosResult
from .operators import LinearOperator
from .persample import gradient_alignment


def _require_initialized(fn: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        fail(fn, "an initialised torch.distributed process group (call "
             "torch.distributed.init_process_group first)", "none", RuntimeError, raw=True)


def shard(data: tuple[torch.Tensor, torch.Tensor], rank: int | None = None,
          world_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous slice of ``(X, y)`` that belongs to ``rank`` (sizes differ by at most 1).

    Args:
        data: ``(X, y)`` with the same first dimension.
        rank, world_size: default to the current process group's.
    """
    fn = "hbk.distributed.shard"
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        fail(fn, "data to be a pair of tensors (X, y)", data, TypeError)
    X, y = data
    if X.dim() == 0 or y.dim() == 0 or X.shape[0] != y.shape[0]:
        fail(fn, "X and y with the same number of rows",
             f"shapes {tuple(X.shape)} and {tuple(y.shape)}", raw=True)
    if rank is None or world_size is None:
        _require_initialized(fn)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    check_int(fn, "world_size", world_size, 1)
    check_int(fn, "rank", rank)
    if not 0 <= rank < world_size:
        fail(fn, "0 <= rank < world_size", f"rank {rank}, world_size {world_size}", raw=True)
    n = X.shape[0]
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return X[start:stop], y[start:stop]


class DistributedHessianOperator(LinearOperator):
    """The Hessian of the objective over the union of all ranks' shards.

    The local product is weighted by ``n_local / N`` for a "mean" loss (the mean over all
    ranks' samples) and by 1 for a "sum" loss, then all-reduced.

    Args:
        model, loss_fn: as for :class:`hbkernels.HessianOperator` (same model on every rank).
        local_data: this rank's ``(X, y)`` or batches.
        group: the process group (default: the world).
        **kwargs: forwarded to :class:`hbkernels.HessianOperator` (params, method, dtype,
            reduction, ...).

    Attributes:
        dim: ``p``; num_samples: total over ranks; num_matvecs: products on this rank.
    """

    name = "DistributedHessianOperator"

    def __init__(self, model: nn.Module, loss_fn: Callable, local_data: Any, group=None, **kwargs: Any):
        _require_initialized(f"hbk.{self.name}")
        self.local = HessianOperator(model, loss_fn, local_data, **kwargs)
        super().__init__(self.local.dim, self.local.dtype, self.local.device)
        self.group = group
        total = torch.tensor([float(self.local.num_samples)], dtype=torch.float64)
        dist.all_reduce(total, group=group)
        self.num_samples = int(total.item())
        mean = self.local.objective.loss.reduction == "mean"
        self.weight = self.local.num_samples / self.num_samples if mean else 1.0
        self.methods_used = self.local.methods_used

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """A collective: call on every rank."""
        out = self.local.matvec(V).mul_(self.weight)
        dist.all_reduce(out, group=self.group)
        return out


def distributed_hessian_eigs(model: nn.Module, loss_fn: Callable, local_data: Any, k: int,
                             which: str = "LA", tol: float = 1e-6, seed: int = 0, group=None,
                             **kwargs: Any) -> LanczosResult:
    """Top-k Hessian eigenpairs over sharded data; returns the same result on every rank.

    The Lanczos start vector comes from ``seed`` (the same on every rank), so the drivers on all
    ranks take identical steps. Arguments as for :func:`hbkernels.hessian_eigs` (operator
    keywords: params, method, hvp_dtype, reduction, forward, check_deterministic, ...).
    """
    op_keys = ("params", "method", "reduction", "forward", "check_deterministic", "allow_shuffle", "cache")
    op_kw = {k: kwargs.pop(k) for k in op_keys if k in kwargs}
    if "hvp_dtype" in kwargs:
        op_kw["dtype"] = kwargs.pop("hvp_dtype")
    op = DistributedHessianOperator(model, loss_fn, local_data, group=group, **op_kw)
    return eigs(op, k, which=which, tol=tol, seed=seed, **kwargs)


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor in rank order (n_r may differ)."""
    _require_initialized("hbk.distributed.gather_rows")
    if not isinstance(local, torch.Tensor) or local.dim() == 0:
        fail("hbk.distributed.gather_rows", "a tensor with a row dimension", local, TypeError)
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
