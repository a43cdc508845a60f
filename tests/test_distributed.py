"""Data-parallel operators: two gloo processes on this machine agree with one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import hbkernels as hbk
from hbkernels import distributed as hdist


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(41, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (41,))
    return model, X, y


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, X, y = _problem()
        local = hdist.shard((X, y))
        op = hdist.DistributedHessianOperator(model, F.cross_entropy, local)
        V = torch.eye(op.dim, dtype=torch.float64)[:, :7]
        res = hdist.distributed_hessian_eigs(model, F.cross_entropy, local, k=3, tol=1e-10, seed=3)
        align = hdist.distributed_gradient_alignment(model, local[0], res.eigenvectors)
        op_sum = hdist.DistributedHessianOperator(model, torch.nn.CrossEntropyLoss(reduction="sum"), local)
        torch.save({"HV": op.matvec(V), "n": op.num_samples, "vals": res.eigenvalues,
                    "vecs": res.eigenvectors, "align": align, "HV_sum": op_sum.matvec(V)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))

    model, X, y = _problem()
    H = hbk.exact_hessian(model, F.cross_entropy, (X, y))
    assert r0["n"] == 41
    torch.testing.assert_close(r0["HV"], H[:, :7], rtol=1e-9, atol=1e-12)
    # a "sum" loss adds the ranks' Hessians (weight 1), it is not a size-weighted mean
    torch.testing.assert_close(r0["HV_sum"], 41 * H[:, :7], rtol=1e-9, atol=1e-10)
    # Every rank holds the identical result (lockstep Lanczos on all-reduced products).
    assert torch.equal(r0["vals"], r1["vals"]) and torch.equal(r0["vecs"], r1["vecs"])
    torch.testing.assert_close(r0["vals"], torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8, atol=1e-12)
    expected = hbk.gradient_alignment(model, X, r0["vecs"])
    torch.testing.assert_close(r0["align"], expected, rtol=1e-9, atol=1e-12)


def test_shard_covers_the_data_once():
    X, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = [hdist.shard((X, y), rank=r, world_size=3) for r in range(3)]
    assert [p[0].shape[0] for p in parts] == [3, 3, 4]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size"):
        hdist.shard((X, y), rank=3, world_size=3)


def test_shard_refuses_mismatched_data():
    """12 rows of X and 4 labels gave shards of 6 and 0 rows; now a clear error."""
    X, y = torch.randn(12, 2), torch.arange(4)
    with pytest.raises(ValueError, match=r"hbk.distributed.shard: expected X and y with the same "
                       r"number of rows, got shapes \(12, 2\) and \(4,\)"):
        hdist.shard((X, y), rank=0, world_size=2)
    with pytest.raises(TypeError, match="expected data to be a pair of tensors"):
        hdist.shard(X, rank=0, world_size=2)
    with pytest.raises(ValueError, match="expected world_size >= 1"):
        hdist.shard((X, X), rank=0, world_size=0)
    with pytest.raises(TypeError, match="expected rank to be an int"):
        hdist.shard((X, X), rank="0", world_size=2)


def test_operator_requires_a_process_group():
    model, X, y = _problem()
    with pytest.raises(RuntimeError, match="init_process_group"):
        hdist.DistributedHessianOperator(model, F.cross_entropy, (X, y))
    assert issubclass(hdist.DistributedHessianOperator, hbk.LinearOperator)
