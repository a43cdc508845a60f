"""Scaling: time and peak memory against n (samples), p (width) and k (vectors), with the
machine limit beside each curve, plus the kernel-level table (former bench_kernels.py).

Limits: per-sample alignment and Gram, the FLOPs of the GEMM on a given G ((n,p)@(p,k), and
G G^T) at the GEMM rate measured in the same run; Lanczos, the minimal HVP count (k: one
product per wanted vector) times the measured time of one HVP; memory, the output (n x k or
n x n floats) beside the dense G (n x p) that the anchors materialise.
"""

from __future__ import annotations

import statistics
import time

import _harness as H
import torch
from models import make_case


def _timed(fn, repeats: int, device: str = "cpu") -> tuple[float, float | None, object]:
    ans = fn()  # warm-up
    times, peak = [], None
    for _ in range(repeats):
        with H.PeakMemory(device) as mem:
            t0 = time.perf_counter()
            ans = fn()
            H.sync(device)
            times.append(time.perf_counter() - t0)
        if mem.extra_mb is not None:
            peak = max(peak or 0.0, mem.extra_mb)
    return statistics.median(times), peak, ans


def gemm_rate(device: str = "cpu", size: int = 2048) -> float:
    """Measured GFLOP/s of one torch.matmul (size x size) @ (size x size)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    t, _, _ = _timed(lambda: a @ b, 3, device)
    return 2.0 * size**3 / t / 1e9


def persample_point(n: int, width: int, k: int, repeats: int, op: str, vmap: bool) -> dict:
    from task_persample import finish, vmap_grads

    import hbkernels as hbk

    case = make_case("mlp", "full", n=n, width=width, steps=0)
    model, X = case.model, case.X
    V = torch.randn(case.p, k, generator=torch.Generator().manual_seed(2))
    if op == "align":
        t, mem, ans = _timed(lambda: hbk.gradient_alignment(model, X, V), repeats)
    else:
        t, mem, ans = _timed(lambda: hbk.gradient_gram(model, X), repeats)
    out = {"n": case.n, "p": case.p, "k": k, "op": op, "hbk_s": t, "hbk_mb": mem}
    if vmap:
        with torch.no_grad():
            y = model(X).argmax(1)
        tv, mv, ref = _timed(lambda: finish(op, vmap_grads(model, X, y), V), repeats)
        err = float((ans - ref).abs().max() / ref.abs().max())
        out.update(vmap_s=tv, vmap_mb=mv, agrees=err <= 1e-3, err=err)
    return out


def lanczos_point(n: int, k: int, repeats: int) -> dict:
    import torch.nn.functional as F

    import hbkernels as hbk

    case = make_case("mlp", "full", n=n, steps=50)
    op = hbk.HessianOperator(case.model, F.cross_entropy, case.data)
    v = torch.randn(case.p, generator=torch.Generator().manual_seed(0))
    t_hvp, _, _ = _timed(lambda: op.matvec(v), max(3, repeats))
    res = {}

    def call():
        r = hbk.hessian_eigs(case.model, F.cross_entropy, case.data, k=k, tol=1e-6, seed=0)
        res["r"] = r
        return r

    t, mem, _ = _timed(call, repeats)
    r = res["r"]
    return {"n": case.n, "p": case.p, "k": k, "hbk_s": t, "hbk_mb": mem, "hvp_s": t_hvp,
            "hvps": int(r.num_matvecs), "limit_s": k * t_hvp, "in_hvp_s": r.matvec_seconds,
            "converged": int(r.converged.sum())}


def kernel_rows(scale: str, repeats: int, rate: float) -> list[dict]:
    """Each dense kernel vs its plain-torch composite (GFLOP/s at the composite's FLOPs)."""
    import hbkernels as hbk
    from hbkernels import reference as ref

    n, p, k = (2048, 8192, 64) if scale == "full" else (128, 256, 8)
    g = torch.Generator().manual_seed(0)
    G = torch.randn(n, p, generator=g)
    V = torch.randn(p, k, generator=g)
    rows = []
    for name, ours, comp, flops in (
            ("gram", lambda: hbk.gram(G), lambda: ref.gram(G), 2.0 * n * n * p),
            ("cosine_alignment", lambda: hbk.cosine_alignment(G, V),
             lambda: ref.cosine_alignment(G, V), 2.0 * n * p * k)):
        truth = comp()

        def check(a, truth=truth):
            err = float((a - truth).abs().max() / truth.abs().max())
            return err <= 1e-4, err, f"max rel err {err:.1e}"

        rs = H.run_tools([H.Tool(f"hbk.{name}", lambda f=ours: f, ours=True),
                          H.Tool("plain torch composite", lambda f=comp: f, reference=True)],
                         check, repeats, task="kernels", case=f"{name} n={n} p={p}"
                         + (f" k={k}" if name != "gram" else ""))
        for r in rs:
            if r.get("median_s"):
                r["gflops"] = flops / r["median_s"] / 1e9
                r["note"] = f"{r['gflops']:.0f} GFLOP/s nominal (matmul {rate:.0f})"
        rows += rs
    return rows


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    rate = gemm_rate(size=2048 if scale == "full" else 256)
    print(f"[scaling] GEMM {rate:.1f} GFLOP/s", flush=True)
    full = scale == "full"
    ns = [250, 1000, 4000, 16000] if full else [30, 60]
    widths = [25, 50, 100, 200] if full else [8, 16]
    ks = [4, 16, 64, 256, 1024] if full else [2, 8]
    lk = [2, 5, 10, 20] if full else [2, 3]
    ln = [250, 1000, 4000] if full else [30, 60]
    pts = []
    for n in ns:
        for op in ("align", "gram"):
            if op == "gram" and n > 4000:
                continue
            pts.append({"axis": "n", **persample_point(n, 100 if full else 16, 25 if full else 4,
                                                       repeats, op, vmap=True)})
    for w in widths:
        pts.append({"axis": "p", **persample_point(1000 if full else 60, w, 25 if full else 4,
                                                   repeats, "align", vmap=True)})
    for k in ks:
        pts.append({"axis": "k", **persample_point(1000 if full else 60, 100 if full else 16,
                                                   k, repeats, "align", vmap=k <= 256)})
    print("[scaling] per-sample: done", flush=True)
    for k in lk:
        pts.append({"axis": "k", "op": "lanczos", **lanczos_point(999 if full else 60, k,
                                                                  repeats)})
    for n in ln:
        pts.append({"axis": "n", "op": "lanczos", **lanczos_point(n, 5 if full else 2,
                                                                  repeats)})
    print("[scaling] lanczos: done", flush=True)
    for pt in pts:
        if pt["op"] == "align":
            pt["limit_s"] = 2.0 * pt["n"] * pt["p"] * pt["k"] / rate / 1e9
            pt["out_mb"] = 4.0 * pt["n"] * pt["k"] / 2**20
        elif pt["op"] == "gram":
            pt["limit_s"] = 1.0 * pt["n"] ** 2 * pt["p"] / rate / 1e9  # symmetric half
            pt["out_mb"] = 4.0 * pt["n"] ** 2 / 2**20
        else:
            pt["out_mb"] = 4.0 * pt["p"] * pt["k"] / 2**20
        pt["dense_g_mb"] = 4.0 * pt["n"] * pt["p"] / 2**20
        pt.update(task="scaling", gemm_gflops=rate)
    rows = kernel_rows(scale, repeats, rate)
    print("[scaling] kernels: done", flush=True)
    return pts + rows


def plot(points: list[dict], out_dir) -> list[str]:
    """Three log-log PNGs (vs n, p, k): time (left) and peak memory (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for axis, label in (("n", "samples n"), ("p", "parameters p"), ("k", "vectors k")):
        pts = [q for q in points if q.get("axis") == axis]
        if not pts:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for op, color in (("align", "C0"), ("gram", "C1"), ("lanczos", "C2")):
            s = sorted((q for q in pts if q["op"] == op), key=lambda q: q[axis])
            if not s:
                continue
            x = [q[axis] for q in s]
            name = {"align": "hbk alignment", "gram": "hbk Gram", "lanczos": "hbk Lanczos"}[op]
            a1.loglog(x, [q["hbk_s"] for q in s], "o-", color=color, label=name)
            a1.loglog(x, [q["limit_s"] for q in s], "--", color=color,
                      label=("GEMM limit" if op != "lanczos" else "k x HVP time") + f" ({op})")
            if any("vmap_s" in q for q in s):
                sv = [q for q in s if "vmap_s" in q]
                a1.loglog([q[axis] for q in sv], [q["vmap_s"] for q in sv], "x:", color=color,
                          label=f"vmap(grad) + GEMM ({op})")
            if any(q.get("hbk_mb") for q in s):
                a2.loglog(x, [max(q.get("hbk_mb") or 0, 0.1) for q in s], "o-", color=color,
                          label=f"hbk peak ({op})")
                a2.loglog(x, [q["out_mb"] for q in s], "--", color=color,
                          label=f"output size ({op})")
        s = sorted((q for q in pts if q["op"] != "lanczos"), key=lambda q: q[axis])
        if s:
            a2.loglog([q[axis] for q in s], [q["dense_g_mb"] for q in s], "k:",
                      label="dense G (n x p)")
        a1.set_xlabel(label)
        a1.set_ylabel("seconds (median)")
        a2.set_xlabel(label)
        a2.set_ylabel("MB above start")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        a1.grid(True, which="both", alpha=0.3)
        a2.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"scaling against {label} (paper MLP, GEMM "
                     f"{pts[0]['gemm_gflops']:.0f} GFLOP/s)")
        fig.tight_layout()
        path = out_dir / f"scaling_{axis}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path.name)
    return files
