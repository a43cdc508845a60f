"""G of the paper's MLP by three exact routes: range (block products), tridiagonalisation, eigh.

The model: hbk.boundary.models.FNN2Layer 2-w-w-3 in float64 (w = 100: p = 10,703, the
reference Table 1 net), trained full-batch (SGD lr 0.05, --epochs) on the 150 training points
of the 3-class Gaussian mixture; gradients at the predicted labels; eps from 5 random
directions (hbk.boundary.random_direction_threshold, seed 42, round-off rule of analyze).

Routes (run one after the other in one process, same thread count):

* ``range``: hbk.rangespace.range_spectrum on the HessianOperator (H never formed);
* ``tri64``: hbk.exact_hessian + hbk.tridiag.alignment_spectrum (float64);
* ``eigh``: hbk.exact_hessian + torch.linalg.eigh (MKL syevd) + one GEMM for the cosines.

Prints and writes bench/results/range_p<p>.{json,md}: wall and CPU seconds, the speedup
against eigh, the rank and residual of the range route, its null-space alignment bound
against eps, and the agreement (max eigenvalue difference, G counts of both rules).

    .venv/bin/python bench/bench_range.py --width 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hbkernels as hbk
from hbkernels.boundary import measures as M
from hbkernels.boundary.datasets import load_dataset
from hbkernels.boundary.models import FNN2Layer
from hbkernels.rangespace import range_spectrum
from hbkernels.tridiag import alignment_spectrum

OUT = Path(__file__).resolve().parent / "results"


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def _counts(C: torch.Tensor, eps: float, keep: torch.Tensor) -> tuple[int, int]:
    a = C[keep].abs()
    return int((a.amax(0) >= eps).sum()), int((a.mean(0) > eps).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--routes", nargs="+", default=["range", "tri64", "eigh"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("gauss")
    X, y = ds.train_data()
    X = X.double()
    torch.manual_seed(0)
    m = FNN2Layer(2, (args.width, args.width), 3).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(args.epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X), y).backward()
        opt.step()
    loss = torch.nn.functional.cross_entropy
    p = sum(t.numel() for t in m.parameters())
    G = hbk.per_sample_grads(m, X, labels="pred", loss="ce")
    norms = G.norm(dim=1)
    keep = M.roundoff_mask(norms, torch.float64)
    rand = M.random_directions(p, 5, 42, dtype=torch.float64)
    Gu = G / norms.clamp_min(1e-300)[:, None]
    eps = float(M.threshold_from_alignments(Gu @ rand, keep).mean())
    rows: dict[str, dict] = {}
    for route in args.routes:
        if route == "range":
            op = hbk.HessianOperator(m, loss, (X, y))
            res, wall, cpu = _timed(lambda op=op: range_spectrum(op, G, block=256))
            if res is None:
                print(f"range: rank above p / 3 = {p // 3} (the route gives up), {wall:.1f} s")
                continue
            ev, C = res.eigenvalues, res.alignments
            extra = {"rank": res.rank, "residual": res.residual,
                     "null_alignment_max": float(res.null_alignment[keep].max()),
                     "stages": res.seconds}
        else:
            H, hw, hc = _timed(lambda: hbk.exact_hessian(m, loss, (X, y), quiet=True))
            if route == "tri64":
                r, wall, cpu = _timed(lambda H=H: alignment_spectrum(H, G, return_alignments=True,
                                                                  overwrite=True))
                ev, C, extra = r.eigenvalues, r.alignments, {"stages": r.seconds}
            else:
                def eigh_route(H=H):
                    w, V = torch.linalg.eigh(H)
                    return w.flip(0), Gu @ V.flip(1)

                (ev, C), wall, cpu = _timed(eigh_route)
                extra = {}
            extra["hessian_wall"], extra["hessian_cpu"] = hw, hc
            wall, cpu = wall + hw, cpu + hc
            del H
        gmax, gmean = _counts(C, eps, keep)
        rows[route] = {"wall": wall, "cpu": cpu, "G_max_count": gmax, "G_mean_count": gmean,
                       "eigenvalues": ev, **extra}
        print(route, f"wall {wall:.1f} s cpu {cpu:.1f} s G_max {gmax} G_mean {gmean}",
              {k: v for k, v in extra.items() if k != "stages"}, flush=True)
    ref = rows.get("eigh") or rows[args.routes[-1]]
    doc = {"p": p, "n": int(X.shape[0]), "threads": args.threads, "eps": eps, "routes": {}}
    for k, r in rows.items():
        d = {kk: vv for kk, vv in r.items() if kk != "eigenvalues"}
        d["max_eig_diff_vs_ref"] = float((r["eigenvalues"] - ref["eigenvalues"]).abs().max())
        d["speedup_vs_ref"] = ref["wall"] / r["wall"]
        doc["routes"][k] = d
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"range_p{p}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float))
    md = [(f"# G of the MLP 2-{args.width}-{args.width}-3 (p = {p}, n = {doc['n']}) by three exact "
          f"routes (bench/bench_range.py)\n"),
          (f"Command: `python bench/bench_range.py --width {args.width} --threads {args.threads} "
          f"--epochs {args.epochs}`; eps = {eps:.4f}. Wall times on the shared 2-core machine.\n"),
          ("| route | wall s | CPU s | vs eigh | G_max count | G_mean count | max eig diff vs eigh | "
          "rank / residual / null bound |"), "|---|---|---|---|---|---|---|---|"]
    for k, d in doc["routes"].items():
        rr = (f"{d['rank']} / {d['residual']:.1e} / {d['null_alignment_max']:.1e}"
              if "rank" in d else "")
        md.append(f"| {k} | {d['wall']:.1f} | {d['cpu']:.1f} | {d['speedup_vs_ref']:.2f}x | "
                  f"{d['G_max_count']} | {d['G_mean_count']} | {d['max_eig_diff_vs_ref']:.1e} | {rr} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
