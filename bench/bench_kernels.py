"""Each kernel vs its plain-torch composite on CPU: median time, GFLOP/s and peak memory.

Shapes (issue 2): dense Gram and alignment at n = 4096, p = 16384, k = 64; factored Gram with
three 256-wide layers at n = 8192 (and factored alignment on the same factors, k = 64).
Every (kernel, method) runs in a fresh subprocess so its peak RSS above the inputs is its own.

Usage: python bench/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

CASES = {
    # name: (methods, description)
    "gram": ("hbk.gram vs G @ G.T", ["composite", "hbk"]),
    "alignment": ("hbk.cosine_alignment vs (G V) / norms", ["composite", "hbk"]),
    "ghost_gram": ("hbk.ghost_gram vs sum_l (A A^T + 1) * (D D^T)", ["composite", "hbk"]),
    "ghost_alignment": ("hbk.ghost_alignment vs einsum composite", ["composite", "hbk"]),
}


def make_inputs(case: str, quick: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    if case in ("gram", "alignment"):
        n, p, k = (1024, 4096, 64) if quick else (4096, 16384, 64)
        G = torch.randn(n, p, generator=g)
        V = torch.randn(p, k, generator=g)
        return {"G": G, "V": V, "n": n, "p": p, "k": k}
    n, width, k = (2048, 256, 64) if quick else (8192, 256, 64)
    A = [torch.randn(n, width, generator=g) for _ in range(3)]
    D = [torch.randn(n, width, generator=g) for _ in range(3)]
    W = [torch.randn(width, width, k, generator=g) for _ in range(3)]
    Wb = [torch.randn(width, k, generator=g) for _ in range(3)]
    return {"A": A, "D": D, "W": W, "Wb": Wb, "n": n, "width": width, "k": k}


def make_call(case: str, method: str, x: dict):
    import torch

    import hbkernels as hbk
    from hbkernels import reference as ref

    if case == "gram":
        return (lambda: hbk.gram(x["G"])) if method == "hbk" else (lambda: ref.gram(x["G"]))
    if case == "alignment":
        f = hbk.cosine_alignment if method == "hbk" else ref.cosine_alignment
        return lambda: f(x["G"], x["V"])
    bias = [True] * 3
    if case == "ghost_gram":
        if method == "hbk":
            return lambda: hbk.ghost_gram(x["A"], x["D"], bias)

        def composite():
            return sum((a @ a.T + 1) * (d @ d.T) for a, d in zip(x["A"], x["D"]))

        return composite
    if method == "hbk":
        return lambda: hbk.ghost_alignment(x["A"], x["D"], x["W"], x["Wb"])

    def composite_alignment():  # the natural einsum composite
        dots = sum(torch.einsum("no,oik,ni->nk", d, w, a) + d @ wb
                   for a, d, w, wb in zip(x["A"], x["D"], x["W"], x["Wb"]))
        gsq = sum((a.square().sum(1) + 1) * d.square().sum(1) for a, d in zip(x["A"], x["D"]))
        vsq = sum(w.square().sum((0, 1)) + wb.square().sum(0) for w, wb in zip(x["W"], x["Wb"]))
        return ref.cosine_from_dots(dots, gsq, vsq)

    return composite_alignment


def nominal_flops(case: str, x: dict) -> float:
    if case == "gram":
        return 2.0 * x["n"] ** 2 * x["p"]
    if case == "alignment":
        return 2.0 * x["n"] * x["p"] * x["k"]
    if case == "ghost_gram":
        return 3 * 2.0 * x["n"] ** 2 * (2 * x["width"])
    return 3 * 2.0 * x["n"] * x["width"] ** 2 * x["k"]


def matmul_reference(case: str, x: dict):
    """torch.matmul with the same FLOPs as the composite (the machine's GEMM rate)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if case == "gram":
        a, b = x["G"], x["G"].T.contiguous()
    elif case == "alignment":
        a, b = x["G"], x["V"]
    elif case == "ghost_gram":
        a = torch.randn(x["n"], 3 * 2 * x["width"], generator=g)
        b = a.T.contiguous()
    else:
        a = torch.randn(x["n"], 3 * x["width"] ** 2, generator=g)
        b = torch.randn(3 * x["width"] ** 2, x["k"], generator=g)
    return lambda: torch.matmul(a, b)


def worker(case: str, method: str, quick: bool, repeats: int) -> dict:
    x = make_inputs(case, quick)
    call = matmul_reference(case, x) if method == "matmul" else make_call(case, method, x)
    call()  # warm-up (allocator, thread pool)
    rss0 = H.current_rss_bytes()
    peak0 = H.peak_rss_bytes()
    seconds = H.median_time(call, repeats=repeats, warmup=0)
    extra = max(0, H.peak_rss_bytes() - max(rss0, peak0 if method == "matmul" else rss0))
    return {"case": case, "method": method, "seconds": seconds,
            "gflops": nominal_flops(case, x) / seconds / 1e9,
            "peak_extra_mb": extra / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.quick, args.repeats)))
        return

    rows = []
    extra = ["--quick"] if args.quick else []
    for case in args.cases:
        desc, methods = CASES[case]
        res = {m: H.run_worker(__file__, case, m, *extra, "--repeats", str(args.repeats))
               for m in methods + ["matmul"]}
        n_by_n = 4 * (8192 if case.startswith("ghost") and not args.quick else 0) ** 2 / 2**20
        rows.append({
            "kernel": case, "what": desc,
            "composite_s": res["composite"]["seconds"], "hbk_s": res["hbk"]["seconds"],
            "speedup": res["composite"]["seconds"] / res["hbk"]["seconds"],
            "hbk_gflops": res["hbk"]["gflops"], "composite_gflops": res["composite"]["gflops"],
            "matmul_gflops": res["matmul"]["gflops"],
            "composite_peak_mb": res["composite"]["peak_extra_mb"],
            "hbk_peak_mb": res["hbk"]["peak_extra_mb"],
            "nxn_mb": n_by_n or None,
        })
        print(f"{case}: {rows[-1]['speedup']:.2f}x", flush=True)
    cols = [("kernel", "kernel"), ("composite_s", "composite s"), ("hbk_s", "hbk s"),
            ("speedup", "speedup"), ("composite_gflops", "composite GFLOP/s"),
            ("hbk_gflops", "hbk GFLOP/s (nominal)"), ("matmul_gflops", "matmul GFLOP/s"),
            ("composite_peak_mb", "composite peak MB"), ("hbk_peak_mb", "hbk peak MB")]
    table = H.markdown_table(rows, cols)
    meta = H.machine_meta() | {"quick": args.quick, "repeats": args.repeats,
                                "note": "GFLOP/s use the composite's nominal FLOPs; hbk.gram "
                                        "does about half of them (upper triangle only)"}
    if args.cases == list(CASES):
        H.save_results("kernels" + ("_quick" if args.quick else ""), rows, table, meta)
    print(table)


if __name__ == "__main__":
    main()
