"""One closed-form conv-chain HVP against one gradient (issue 11 item 2), at 1 thread.

For LeNet-5 (3x32x32, 10 classes, n = 512) and the paper's MNIST CNN (1x28x28, 3 classes,
n = 256) of ``bench/models.py`` (the sizes of ``bench_speed.py``): one ``loss.backward()``
over the data (forward included), one ``HessianOperator`` product with ``method="conv_chain"``
and with ``"double_backward"`` (kept graph), single vectors and per vector in a block of 8,
float32 and float64. Reports the fastest of ``--repeats`` interleaved runs (shared machine)
and the ratios HVP / gradient.

    python bench/conv_chain_speed.py [--models lenet5,cnn] [--repeats 7] [--dtypes float32,float64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import make_case

import hbkernels as hbk

N = {"lenet5": 512, "cnn": 256}


def _best(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def row(case, dt: torch.dtype, repeats: int) -> str:
    """One table row: gradient, conv-chain HVP (single, per vector of 8), double backward."""
    model, X = case.model.to(dt), case.X.to(dt)

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        case.loss_fn(model(X), case.y).backward()

    chain = hbk.HessianOperator(model, case.loss_fn, (X, case.y), method="conv_chain")
    ror = hbk.HessianOperator(model, case.loss_fn, (X, case.y), method="double_backward")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(chain.dim, generator=g, dtype=dt)
    V = torch.randn(chain.dim, 8, generator=g, dtype=dt)
    tg = _best(grad, repeats)
    tc = _best(lambda: chain @ v, repeats)
    tc8 = _best(lambda: chain @ V, max(2, repeats // 2)) / 8
    td = _best(lambda: ror @ v, repeats)
    return (f"| {case.name} (n = {case.n}, p = {case.p}) | {str(dt)[6:]} | {tg:.4g} | {tc:.4g} | "
            f"{tc / tg:.2f} | {tc8 / tg:.2f} | {td:.4g} | {td / tg:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="lenet5,cnn")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | dtype | grad s | conv_chain HVP s | / grad | per vector in 8 / grad | "
          f"double_backward HVP s | / grad |  ({args.threads} thread, min of {args.repeats})")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        case = make_case(name, n=N[name])
        for dname in args.dtypes.split(","):
            print(row(case, getattr(torch, dname), args.repeats), flush=True)
            case.model.float()

if __name__ == "__main__":
    main()
