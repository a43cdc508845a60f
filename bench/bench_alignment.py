"""Per-sample gradient alignment and Gram: hbkernels vs the paper's loop and the anchors.

Cases (issue 4):

* ``gauss1k``: the paper's MLP 2-100-100-3 (p = 10,703, ReLU) on n = 1,000 Gaussian points
  (3 classes, means (2,-1), (-2,0), (0,2), stds (0.5,0.5), (0.5,1.0), (0.5,0.5), numpy
  RandomState(42), 334 draws per class, the first 1,000 kept); alignment with k = 25 and 64
  random vectors, and the Gram matrix.
* ``grid200``: the same MLP on a 200 x 200 grid over [-4, 4]^2 (n = 40,000), k = 25 and 64.
* ``mlp784``: an MLP 784-256-256-10 (p = 269,322) on n = 10,000 uniform random inputs.
* ``allp``: 150 Gaussian points against all p = 10,703 vectors (random unit vectors; the time
  does not depend on their values), the paper's G measure workload.
* ``gram4096``: the Gram matrix on a 64 x 64 grid (n = 4,096).

Methods: ``hbk`` (hbk.gradient_alignment / hbk.gradient_gram, default memory budget), ``paper``
(the reference code's pattern, rewritten: one forward/backward per sample with the predicted
label, flatten, ``np.dot(list_of_vectors, g) / |g|``), ``vmap`` (torch.func vmap(grad) for all n,
then one GEMM and the norms), ``backpack`` (BackPACK BatchGrad, then the GEMM), ``opacus``
(Opacus GradSampleModule, then the GEMM), ``matmul`` (the machine limit: one torch.matmul
(n, p) @ (p, k) with G given for free, i.e. the same FLOPs as the alignment).

Each (case, method) runs in a fresh subprocess, once per ``--threads`` value. Time: the median
(and the min) of several calls after one warm-up call. Memory: the process's peak RSS while the method runs (VmHWM reset after set-up),
reported in total and above the RSS after set-up. Where a method would not fit (a dense G above
half of the free memory, e.g. 10.8 GB for mlp784) or take too long (the paper's loop on large
n), it is timed on a subset of ``n_sub`` samples and scaled by n / n_sub (time; memory above
set-up linearly), shown by "measured on n" < n in the table.

Usage: python bench/bench_alignment.py [--quick] [--only CASE ...] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

# case -> (n, list of (kind, k, methods))
CASES: dict[str, tuple[int, list[tuple[str, int, list[str]]]]] = {
    "gauss1k": (1000, [
        ("align", 25, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
        ("align", 64, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
        ("gram", 0, ["hbk", "vmap"]),
    ]),
    "grid200": (40_000, [
        ("align", 25, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
        ("align", 64, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
    ]),
    "mlp784": (10_000, [
        ("align", 25, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
        ("align", 64, ["hbk", "paper", "vmap", "backpack", "opacus", "matmul"]),
    ]),
    "allp": (150, [("align", 10_703, ["hbk", "paper", "vmap", "matmul"])]),
    "gram4096": (4096, [("gram", 0, ["hbk", "vmap"])]),
}
QUICK_N = {"gauss1k": 300, "grid200": 2500, "mlp784": 1000, "allp": 20, "gram4096": 512}
# Subsets for the methods that are too slow (paper loop) or too large (dense G of 10.8 GB).
SUBSET = {
    ("grid200", "paper"): 1000,
    ("mlp784", "paper"): 200,
    ("mlp784", "vmap"): 1000,
    ("mlp784", "backpack"): 1000,
    ("mlp784", "opacus"): 1000,
    ("mlp784", "matmul"): 1000,
    ("allp", "paper"): 2,
}
PARAMS = {"gauss1k": 10_703, "grid200": 10_703, "mlp784": 269_322, "allp": 10_703,
          "gram4096": 10_703}
ANCHOR_PACKAGES = {"backpack": "backpack", "opacus": "opacus"}


# ----------------------------------------------------------------------------- set-up
def hwm_bytes() -> int:
    """Peak RSS since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return H.peak_rss_bytes()


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gauss_points(n: int):
    import numpy as np
    import torch

    from hbkernels.boundary.datasets import _gaussian_blobs

    means = [(2, -1), (-2, 0), (0, 2)]
    stds = [(0.5, 0.5), (0.5, 1.0), (0.5, 0.5)]
    per = -(-n // 3)
    X = _gaussian_blobs(np.random.RandomState(42), means, stds, per)[:n]
    return torch.tensor(X, dtype=torch.float32)


def grid_points(side: int):
    import torch

    g = torch.linspace(-4, 4, side)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)  # x fastest, as the reference


def setup(case: str, n: int, k: int):
    """Model (seeded default init), inputs and vectors of a case."""
    import torch

    from hbkernels.boundary.models import MLP, FNN2Layer

    torch.manual_seed(0)
    if case == "mlp784":
        model = MLP([784, 256, 256, 10], "relu", False)
        X = torch.rand(n, 784, generator=torch.Generator().manual_seed(1))
    else:
        model = FNN2Layer(2, (100, 100), 3)
        if case.startswith("grid"):
            X = grid_points(200)[:n] if n < 40_000 else grid_points(200)
        elif case == "gram4096":
            X = grid_points(64)[:n]
        else:
            X = gauss_points(n)
    p = sum(q.numel() for q in model.parameters())
    V = None
    if k:
        V = torch.randn(p, k, generator=torch.Generator().manual_seed(2))
        V /= V.norm(dim=0, keepdim=True)
    return model, X, V, p


# ----------------------------------------------------------------------------- methods
def paper_loop(model, X, vec_list):
    """The reference code's pattern (paraphrased): one sample at a time, list of vectors."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    params = list(model.parameters())
    out = np.zeros((len(vec_list), X.shape[0]))
    for i in range(X.shape[0]):
        o = model(X[i].reshape(1, -1))
        y = np.argmax(o.detach())
        loss = F.cross_entropy(o.reshape(1, -1), y.reshape(1))
        g = torch.autograd.grad(loss, params)
        g = torch.cat([t.reshape(-1) for t in g]).numpy()
        ov = np.dot(vec_list, g)  # the list becomes a (k, p) array here ...
        if np.linalg.norm(g) != 0:
            ov = np.dot(vec_list, g) / np.linalg.norm(g)  # ... and here again
        out[:, i] = ov
    return out


def vmap_grads(model, X):
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        y = model(X).argmax(1)

    def f(th, x, t):
        return F.cross_entropy(functional_call(model, th, (x[None],)), t[None])

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], 1)


def cosine(G, V):
    return (G @ V) / (G.norm(dim=1, keepdim=True) * V.norm(dim=0, keepdim=True))


def make_call(case: str, kind: str, method: str, model, X, V, p: int):
    import copy

    import torch
    import torch.nn.functional as F

    import hbkernels as hbk

    if method == "hbk":
        if kind == "gram":
            return lambda: hbk.gradient_gram(model, X)
        return lambda: hbk.gradient_alignment(model, X, V)
    if method == "paper":
        Vnp = V.numpy()  # as the reference: a list of column views of the eigenvector array
        vec_list = [Vnp[:, j] for j in range(V.shape[1])]
        return lambda: paper_loop(model, X, vec_list)
    if method == "vmap":
        if kind == "gram":
            return lambda: (lambda G: G @ G.T)(vmap_grads(model, X))
        return lambda: cosine(vmap_grads(model, X), V)
    if method == "matmul":
        G = torch.randn(X.shape[0], p, generator=torch.Generator().manual_seed(3))
        return lambda: torch.matmul(G, V)
    if method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        m = extend(copy.deepcopy(model))
        lossf = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def call():
            out = m(X)
            with backpack(BatchGrad()):
                lossf(out, out.detach().argmax(1)).backward()
            G = torch.cat([q.grad_batch.reshape(X.shape[0], -1) for q in m.parameters()], 1)
            for q in m.parameters():
                q.grad = None
                del q.grad_batch
            return cosine(G, V)

        return call
    if method == "opacus":
        from opacus import GradSampleModule

        m = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

        def call():
            out = m(X)
            F.cross_entropy(out, out.detach().argmax(1), reduction="sum").backward()
            G = torch.cat([q.grad_sample.reshape(X.shape[0], -1) for q in m.parameters()], 1)
            for q in m.parameters():
                q.grad = None
                q.grad_sample = None
            return cosine(G, V)

        return call
    raise ValueError(f"unknown method {method}")


def worker(spec: dict) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # BackPACK / Opacus hook notices
    torch.set_num_threads(spec["threads"])
    case, kind, method, k, n = spec["case"], spec["kind"], spec["method"], spec["k"], spec["n"]
    n_run = spec.get("n_sub") or n
    model, X, V, p = setup(case, n, k)
    X = X[:n_run]
    call = make_call(case, kind, method, model, X, V, p)
    rss0 = H.current_rss_bytes()
    reset_hwm()
    t0 = time.perf_counter()
    with torch.no_grad() if method == "matmul" else torch.enable_grad():
        call()  # warm-up
        first = time.perf_counter() - t0
        repeats = max(1, min(spec.get("repeats", 5), int(4.0 / max(first, 1e-3))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    peak = hwm_bytes()
    return {"seconds": statistics.median(times), "min_seconds": min(times),
            "repeats": repeats, "n_run": n_run,
            "peak_mb": peak / 2**20, "extra_mb": max(0, peak - rss0) / 2**20,
            "base_mb": rss0 / 2**20, "p": p}


# ----------------------------------------------------------------------------- driver
def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    return float("inf")


def have(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


def run_one(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small n (a smoke run)")
    ap.add_argument("--only", nargs="*", default=None, help="cases to run")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls at most")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads in the workers; every case runs once per value "
                         "(1: stable; 2: both cores, but on a shared machine small ops stall "
                         "in OpenMP barriers, so medians vary 10x: the min is shown too)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    rows, skipped = [], []
    for threads in args.threads:
        for case, (n, runs) in CASES.items():
            if args.only and case not in args.only:
                continue
            n = QUICK_N[case] if args.quick else n
            for kind, k, methods in runs:
                for method in methods:
                    row = run_row(case, n, kind, k, method, threads, args.repeats, skipped)
                    if row:
                        rows.append(row)
    # Ratios against hbk in the same (threads, case, op).
    by = {(r["threads"], r["case"], r["op"], r["method"]): r for r in rows}
    for r in rows:
        h = by.get((r["threads"], r["case"], r["op"], "hbk"))
        r["hbk_speedup"] = r["seconds"] / h["seconds"] if h else None
    targets = [t for threads in args.threads for t in evaluate_targets(by, threads)]
    cols = [("threads", "threads"), ("case", "case"), ("op", "op"), ("n", "n"),
            ("method", "method"), ("seconds", "median s"), ("min_seconds", "min s"),
            ("hbk_speedup", "median / hbk"), ("peak_mb", "peak RSS MB"),
            ("extra_mb", "above set-up MB"), ("measured_n", "measured on n"),
            ("repeats", "runs")]
    table = H.markdown_table(rows, cols)
    ttable = H.markdown_table(targets, [("threads", "threads"), ("target", "target"),
                                        ("value", "measured (median)"), ("met", "met")])
    meta = H.machine_meta() | {
        "quick": args.quick,
        "threads": args.threads,
        "command": "python bench/bench_alignment.py " + " ".join(sys.argv[1:]),
        "note": "2 cores shared with other developers' jobs: timings are noisy. Rows with "
                "'measured on n' < n are scaled by n / measured (time; memory above set-up "
                "linearly, except the paper loop whose memory does not grow with n). "
                "Targets use medians.",
        "skipped": skipped,
    }
    name = "alignment" + ("_quick" if args.quick else "")
    H.save_results(name, rows + [{"targets": targets}],
                   table + "\n\n## Targets\n\n" + ttable, meta)
    print(table)
    print()
    print(ttable)


def run_row(case, n, kind, k, method, threads, repeats, skipped) -> dict | None:
    """Run one (case, method) worker and scale subset measurements to n."""
    pkg = ANCHOR_PACKAGES.get(method)
    if pkg and not have(pkg):
        msg = f"{case} {kind} k={k} {method}: skipped ({pkg} is not installed)"
        print(msg, flush=True)
        if msg not in skipped:
            skipped.append(msg)
        return None
    n_sub = SUBSET.get((case, method))
    n_sub = min(n_sub, n) if n_sub else None
    if method in ("vmap", "backpack", "opacus") and not n_sub:
        # Dense G plus per-sample temporaries: keep it below half of the free memory.
        est_mb = 2.5 * n * PARAMS[case] * 4 / 2**20
        if est_mb > 0.5 * available_mb():
            n_sub = max(1, int(n * 0.5 * available_mb() / est_mb))
    spec = {"case": case, "kind": kind, "method": method, "k": k, "n": n,
            "n_sub": n_sub, "repeats": repeats, "threads": threads}
    r = run_one(spec)
    scale = n / r["n_run"]
    mem_scale = scale if method != "paper" else 1.0
    row = {"threads": threads, "case": case, "op": kind if kind == "gram" else f"align k={k}",
           "n": n, "p": r["p"], "method": method,
           "seconds": r["seconds"] * scale, "min_seconds": r["min_seconds"] * scale,
           "peak_mb": r["base_mb"] + r["extra_mb"] * mem_scale,
           "extra_mb": r["extra_mb"] * mem_scale,
           "measured_n": r["n_run"], "repeats": r["repeats"], "extrapolated": scale != 1.0}
    print(f"[{threads} thr] {case} {row['op']} {method}: {row['seconds']:.4g} s "
          f"(min {row['min_seconds']:.4g}), peak {row['peak_mb']:.0f} MB"
          f"{' (extrapolated from n=%d)' % r['n_run'] if scale != 1 else ''}", flush=True)
    return row


def evaluate_targets(by: dict, threads: int) -> list[dict]:
    out = []

    def get(case, op, method):
        r = by.get((threads, case, op, method))
        return r["seconds"] if r else None

    def add(name, value, ok):
        out.append({"threads": threads, "target": name, "value": value,
                    "met": "yes" if ok else "no"})

    for k in (25, 64):
        op = f"align k={k}"
        h, v, m = get("gauss1k", op, "hbk"), get("gauss1k", op, "vmap"), get("gauss1k", op,
                                                                             "matmul")
        if h and v:
            add(f"gauss1k {op}: >= 3x faster than vmap + GEMM", f"{v / h:.1f}x", v / h >= 3)
        if h and m:
            add(f"gauss1k {op}: within 2x of the matmul limit", f"{h / m:.2f}x the limit",
                h / m <= 2)
        h, pl = get("grid200", op, "hbk"), get("grid200", op, "paper")
        if h and pl:
            add(f"grid200 {op}: >= 30x faster than the paper's loop", f"{pl / h:.0f}x",
                pl / h >= 30)
    h, pl = get("allp", "align k=10703", "hbk"), get("allp", "align k=10703", "paper")
    if h and pl:
        add("allp (150 x all p): >= 1000x faster than the paper's loop", f"{pl / h:.0f}x",
            pl / h >= 1000)
    for k in (25, 64):
        hr = by.get((threads, "mlp784", f"align k={k}", "hbk"))
        vr = by.get((threads, "mlp784", f"align k={k}", "vmap"))
        if hr and vr:
            ratio = vr["peak_mb"] / hr["peak_mb"]
            add(f"mlp784 align k={k}: peak memory <= 1/10 of vmap + GEMM",
                f"{hr['peak_mb']:.0f} MB vs {vr['peak_mb']:.0f} MB ({ratio:.0f}x less)",
                ratio >= 10)
    h, v = get("gram4096", "gram", "hbk"), get("gram4096", "gram", "vmap")
    if h and v:
        add("gram4096: ghost Gram >= 5x faster than vmap G G^T", f"{v / h:.1f}x", v / h >= 5)
    return out


if __name__ == "__main__":
    main()
