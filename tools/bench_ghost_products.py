"""ghost_products vs ghost_dots + ghost_sq_norms (raw ops and typed wrappers), one thread.

Run: ``.venv/bin/python tools/bench_ghost_products.py``. Times are the CPU time of the calling
thread (min over interleaved repetitions), which a shared, loaded machine disturbs far less
than wall time. Not a test: speed belongs outside the unit tests.
"""

from __future__ import annotations

import time

import torch

import hbkernels as hbk

ops = torch.ops.hbkernels

CASES = [  # label, n, T, layers (d_in, d_out, bias), k, repetitions
    ("small n=256 2 layers k=4", 256, None, [(20, 20, True), (20, 3, True)], 4, 3000),
    ("mlp n=512 784-256-10 k=16", 512, None, [(784, 256, True), (256, 10, True)], 16, 40),
    ("seq n=128 T=16 k=8", 128, 16, [(64, 128, True), (128, 64, False)], 8, 40),
]


def factors(n, T, layers, k):
    g = torch.Generator().manual_seed(0)
    lead = (n,) if T is None else (n, T)
    A = [torch.randn(*lead, di, generator=g) for di, _, _ in layers]
    D = [torch.randn(*lead, do, generator=g) for _, do, _ in layers]
    B = [b for *_, b in layers]
    W = [torch.randn(do, di, k, generator=g) for di, do, _ in layers]
    Wb = [torch.randn(do, k, generator=g) if b else None for _, do, b in layers]
    return A, D, B, W, Wb, [w for w in Wb if w is not None]


def calls(A, D, B, W, Wb, P):
    return {
        "raw separate": lambda: (ops.ghost_dots(A, D, W, Wb), ops.ghost_sq_norms(A, D, B)),
        "raw fused": lambda: ops.ghost_products(A, D, B, W, P),
        "wrapped separate": lambda: (hbk.ghost_dots(A, D, W, Wb), hbk.ghost_sq_norms(A, D, B)),
        "wrapped fused": lambda: hbk.ghost_products(A, D, B, W, P),
    }


def main() -> None:
    torch.set_num_threads(1)
    for label, n, T, layers, k, reps in CASES:
        fs = calls(*factors(n, T, layers, k))
        best = dict.fromkeys(fs, float("inf"))
        for _ in range(reps):
            for key, f in fs.items():
                t = time.thread_time()
                f()
                best[key] = min(best[key], time.thread_time() - t)
        print(f"{label}: " + ", ".join(f"{key} {v * 1e3:.3f} ms" for key, v in best.items()))


if __name__ == "__main__":
    main()
