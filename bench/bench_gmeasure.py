"""G without a full eigendecomposition (issue 11 item 4): tridiagonalisation vs eigh.

Routes, each giving every eigenvalue and, per eigenvector, max_s |cos(g_s, v_j)| and
mean_s |cos(g_s, v_j)| over n gradients (what G needs):

* ``eigh``: torch.linalg.eigh(H) with vectors (LAPACK syevd, MKL: what hbk.hessian_spectrum
  does), then the cosines by one GEMM (unit gradients times V) and the reductions;
* ``tri64`` / ``tri32``: hbk.alignment_spectrum (hbkernels.tridiag) in float64 / float32:
  sytrd, ormtr on the n gradients, stedc (divide and conquer) for T's eigenpairs, GEMM -- no
  back-transformation; ``tri64_stemr`` / ``tri32_stemr``: the same with MRRR (``stemr``).

Timing part (--sizes, --threads): a seeded random symmetric H (entries N(0, 1), symmetrised)
and n seeded Gaussian gradients with row scales 1e-3..1e3 and 1 % zero rows; the routes run
in interleaved rounds (--routes, default eigh, tri64, tri32, eigh, ...), all at the same
thread count (torch intra-op threads and the BLAS threads of scipy's OpenBLAS). Per size:
median seconds, the speedup (first route / route), the stages, and agreement with the first
route (max |difference| of max_abs and mean_abs, G counts of both rules at an eps from 5
random directions as in the paper: mean_r max_s |cos(g_s, r)|).

Agreement part (--mlp-width): the exact float64 Hessian of the paper's MLP 2-w-w-3
(hbk.boundary.models.FNN2Layer, torch seed 0, 200 epochs of SGD on the 3-class Gaussian
mixture of bench_lanczos, n = 999) and its per-sample gradients with predicted labels; G by
the three routes with eps from hbk.boundary.random_direction_threshold (seed 42).

Writes bench/results/gmeasure.json and .md (or --out).

    .venv/bin/python bench/bench_gmeasure.py --sizes 3000 6000 --threads 1 2 --rounds 2
    .venv/bin/python bench/bench_gmeasure.py --sizes 10703 --threads 1 2 --rounds 1 --tag big
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as Hn

from hbkernels.tridiag import alignment_spectrum


def blas_threads(t: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(t, user_api="blas")


def unit_rows(G: torch.Tensor) -> torch.Tensor:
    nrm = G.norm(dim=1, keepdim=True)
    return G / torch.where(nrm > 0, nrm, torch.ones_like(nrm))


def eigh_route(H: torch.Tensor, G: torch.Tensor, chunk: int = 1024) -> dict:
    c0 = time.process_time()
    t0 = time.perf_counter()
    ev, V = torch.linalg.eigh(H)
    t1 = time.perf_counter()
    U = unit_rows(G.to(H.dtype))
    p = H.shape[0]
    mx, mn = torch.empty(p, dtype=torch.float64), torch.empty(p, dtype=torch.float64)
    for j0 in range(0, p, chunk):
        A = (U @ V[:, j0 : j0 + chunk]).abs()
        mx[j0 : j0 + chunk], mn[j0 : j0 + chunk] = A.amax(0).double(), A.double().mean(0)
    t2 = time.perf_counter()
    return {"eigenvalues": ev.double().flip(0), "max_abs": mx.flip(0), "mean_abs": mn.flip(0),
            "seconds": t2 - t0, "cpu_s": time.process_time() - c0,
            "stages": {"eigh": t1 - t0, "gemm": t2 - t1}}


def tri_route(H: torch.Tensor, G: torch.Tensor, dtype: torch.dtype, threads: int,
              solver: str = "stedc") -> dict:
    c0 = time.process_time()
    t0 = time.perf_counter()
    r = alignment_spectrum(H, G, dtype=dtype, threads=threads, solver=solver)
    return {"eigenvalues": r.eigenvalues, "max_abs": r.max_abs, "mean_abs": r.mean_abs,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "stages": dict(r.seconds)}


ROUTES = {"eigh": None, "tri64": (torch.float64, "stedc"), "tri32": (torch.float32, "stedc"),
          "tri64_stemr": (torch.float64, "stemr"), "tri32_stemr": (torch.float32, "stemr")}


def run_route(name: str, H: torch.Tensor, G: torch.Tensor, threads: int) -> dict:
    if name == "eigh":
        return eigh_route(H, G)
    dtype, solver = ROUTES[name]
    return tri_route(H, G, dtype, threads, solver)


def eps_from_directions(G: torch.Tensor, num: int = 5, seed: int = 42) -> float:
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(G.shape[1], num, generator=gen, dtype=torch.float64)
    R = R / R.norm(dim=0, keepdim=True)
    return float((unit_rows(G.double()) @ R).abs().amax(0).mean())


def agreement(ref: dict, res: dict, eps: float) -> dict:
    out = {"eigenvalue_err": float((ref["eigenvalues"] - res["eigenvalues"]).abs().max()),
           "max_abs_err": float((ref["max_abs"] - res["max_abs"]).abs().max()),
           "mean_abs_err": float((ref["mean_abs"] - res["mean_abs"]).abs().max())}
    ev = ref["eigenvalues"]  # descending; vectors with gaps below 1e-6 |H| are ill-determined
    gaps = ev[:-1] - ev[1:]
    big = 1e9 * torch.ones(1, dtype=ev.dtype)
    ok = torch.minimum(torch.cat([big, gaps]), torch.cat([gaps, big])) > 1e-6 * ev.abs().max()
    out["gapped_fraction"] = float(ok.double().mean())
    if ok.any():
        out["max_abs_err_gapped"] = float((ref["max_abs"] - res["max_abs"])[ok].abs().max())
    for rule, key in (("max", "max_abs"), ("mean", "mean_abs")):
        a, b = ref[key], res[key]
        ca = int((a >= eps).sum()) if rule == "max" else int((a > eps).sum())
        cb = int((b >= eps).sum()) if rule == "max" else int((b > eps).sum())
        err = float((a - b).abs().max())
        out[f"G_{rule}_ref"], out[f"G_{rule}"] = ca, cb
        out[f"near_eps_{rule}"] = int(((a - eps).abs() <= err).sum())  # could fall either way
    return out


def timing_rows(args, save=lambda rows: None) -> list[dict]:
    rows = []
    for p in args.sizes:
        gen = torch.Generator().manual_seed(p)
        A = torch.randn(p, p, generator=gen, dtype=torch.float64)
        H = (A + A.T) / 2
        del A
        scale = torch.logspace(-3, 3, args.n, dtype=torch.float64)[:, None]
        G = torch.randn(args.n, p, generator=gen, dtype=torch.float64) * scale
        G[::100] = 0  # 1 % zero gradients
        eps = eps_from_directions(G)
        for t in args.threads:
            torch.set_num_threads(t)
            times: dict[str, list[float]] = {k: [] for k in args.routes}
            cpu: dict[str, list[float]] = {k: [] for k in args.routes}
            stages: dict[str, dict] = {}
            with blas_threads(t):
                small = torch.eye(64, dtype=torch.float64)
                for dt in (torch.float64, torch.float32):  # warm-up: imports, first calls
                    alignment_spectrum(small, small[:4], dtype=dt, threads=t)
                for _ in range(args.rounds):
                    res = {}
                    for k in args.routes:
                        res[k] = run_route(k, H, G, t)
                        times[k].append(res[k]["seconds"])
                        cpu[k].append(res[k]["cpu_s"])
                        stages[k] = res[k]["stages"]
                        print(f"  {k}: {res[k]['seconds']:.1f} s {res[k]['stages']}", flush=True)
                    print(f"p={p} threads={t}: " + ", ".join(
                        f"{k} {v['seconds']:.1f} s (cpu {v['cpu_s']:.1f} s, {v['stages']})"
                        for k, v in res.items()), flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"p": p, "n": args.n, "threads": t, "rounds": args.rounds, "times": times,
                   "cpu_s": cpu, "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
                   "median_s": med, "stages": stages, "eps": eps}
            for k in args.routes[1:]:  # the first route is the reference (eigh by default)
                row[f"speedup_{k}"] = med[args.routes[0]] / med[k]
                row[f"agree_{k}"] = agreement(res[args.routes[0]], res[k], eps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k.startswith(("speedup", "median"))}),
                  flush=True)
            save(rows)
    return rows


def mlp_rows(args) -> list[dict]:
    from bench_lanczos import gauss_mixture, train

    import hbkernels as hbk
    from hbkernels.boundary import measures as M
    from hbkernels.boundary.models import FNN2Layer

    torch.manual_seed(0)
    w = args.mlp_width
    model = FNN2Layer(2, (w, w), 3)
    X, y = gauss_mixture(999)
    train(model, X, y, 200)
    m = model.double()
    X = X.double()
    t0 = time.perf_counter()
    H = hbk.exact_hessian(m, torch.nn.CrossEntropyLoss(), (X, y))
    G = hbk.per_sample_grads(m, X, labels="pred")
    t_build = time.perf_counter() - t0
    eps = M.random_direction_threshold(m, X).eps
    res = {"eigh": eigh_route(H, G), "tri64": tri_route(H, G, torch.float64, 1),
           "tri32": tri_route(H, G, torch.float32, 1)}
    row = {"model": f"MLP 2-{w}-{w}-3", "p": H.shape[0], "n": G.shape[0], "eps": eps,
           "hessian_and_grads_s": t_build,
           "times": {k: v["seconds"] for k, v in res.items()},
           "agree_tri64": agreement(res["eigh"], res["tri64"], eps),
           "agree_tri32": agreement(res["eigh"], res["tri32"], eps)}
    ev = res["eigh"]["eigenvalues"]
    row["lambda_max"], row["num_abs_below_1e-8"] = float(ev[0]), int((ev.abs() < 1e-8).sum())
    print(json.dumps(row), flush=True)
    return [row]


def markdown(doc: dict) -> str:
    lines = ["# G by tridiagonalisation vs eigh (bench/bench_gmeasure.py)", "",
             f"Command: `{doc['command']}`", ""]
    if doc["timing"]:
        lines += [("| p | n | threads | rounds | route | median s | speedup vs first | stages s | "
                   "max_abs err (gapped) | G max ref / route | G mean ref / route |"),
                  "|" + "---|" * 11]
        for r in doc["timing"]:
            for k, sec in r["median_s"].items():
                st = ", ".join(f"{a} {v:.1f}" for a, v in r["stages"][k].items() if a != "total")
                a = r.get(f"agree_{k}")
                sp = r.get(f"speedup_{k}")
                agree = ("reference | | |" if a is None else
                         f"{a['max_abs_err']:.1e} ({a.get('max_abs_err_gapped', float('nan')):.1e})"
                         f" | {a['G_max_ref']} / {a['G_max']} | {a['G_mean_ref']} / {a['G_mean']} |")
                lines.append(f"| {r['p']} | {r['n']} | {r['threads']} | {r['rounds']} | {k} | "
                             f"{sec:.1f} | {'' if sp is None else f'{sp:.2f}x'} | {st} | {agree}")
    for r in doc["mlp"]:
        lines += ["", f"{r['model']} (p = {r['p']}, n = {r['n']}, eps = {r['eps']:.4g}): times "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in r["times"].items()),
                  f"  tri64: {r['agree_tri64']}", f"  tri32: {r['agree_tri32']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[3000, 6000])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mlp-width", type=int, default=0, help="0: skip the real-Hessian part")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--routes", nargs="+", default=["eigh", "tri64", "tri32"], choices=list(ROUTES),
                    help="run in this order each round; the first is the reference of the ratios")
    args = ap.parse_args()
    doc = {"command": "python bench/bench_gmeasure.py " + " ".join(sys.argv[1:]),
           "timing": [], "mlp": []}
    name = "gmeasure" + (f"_{args.tag}" if args.tag else "")
    Hn.RESULTS.mkdir(exist_ok=True)

    def save(rows=None) -> None:  # after every row: a long run keeps what it measured
        if rows is not None:
            doc["timing"] = rows
        (Hn.RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
        (Hn.RESULTS / f"{name}.md").write_text(markdown(doc))

    timing_rows(args, save)
    if args.mlp_width:
        doc["mlp"] = mlp_rows(args)
    save()
    print(markdown(doc))


if __name__ == "__main__":
    main()
