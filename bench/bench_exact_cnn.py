"""Exact float64 Hessian + full spectrum of the digits CNN: wall, CPU time and peak RSS.

Each case runs in a fresh subprocess (``OMP_NUM_THREADS`` = ``--threads``) so that
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is that case's peak memory. Cases: the model of
``hbkernels.boundary.models.CNN`` on the 8x8 digits (classes 0-2, all 537 images, p = 5,187),
``hbk.exact_hessian`` with ``assembly="split"`` (the default route, ``auto``) and, with
``--columns``, the identity-column route (minutes); then ``torch.linalg.eigh`` (vectors) and
``eigvalsh`` (values only) of the result. The split result is checked against the
column route on ``--rows`` sampled columns (products of the double-backward operator).

Writes ``bench/results/exact_cnn.md``. The machine is shared: wall and CPU time are both
reported (CPU time = user + system of the subprocess).

    .venv/bin/python bench/bench_exact_cnn.py [--threads 2] [--columns] [--rows 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r'''
import json, resource, sys, time, torch, torch.nn.functional as F
import hbkernels as hbk
from hbkernels.boundary.models import CNN
from hbkernels.hessian import HessianOperator
from sklearn.datasets import load_digits
assembly, rows, want_eigh = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
d = load_digits(); m = d.target < 3
X = torch.tensor(d.images[m], dtype=torch.float64)[:, None] / 16; y = torch.tensor(d.target[m])
torch.manual_seed(0)
model = CNN((1, 8, 8), 3).double().eval()
def clock():
    return time.perf_counter(), time.process_time()
out = {"p": sum(q.numel() for q in model.parameters()), "n": int(X.shape[0]),
       "threads": torch.get_num_threads(),
       "rss_start_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
w0, c0 = clock()
H = hbk.exact_hessian(model, F.cross_entropy, (X, y), assembly=assembly)
w1, c1 = clock()
out.update(hessian_wall=w1 - w0, hessian_cpu=c1 - c0,
           rss_hessian_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
if rows:
    op = HessianOperator(model, F.cross_entropy, (X, y), method="double_backward")
    idx = torch.linspace(0, out["p"] - 1, rows).long().unique()
    ref = torch.stack([op.columns(int(j), int(j) + 1)[:, 0] for j in idx], 1)
    out["max_rel_err"] = float((H[:, idx] - ref).abs().max() / ref.abs().max())
    del op
if want_eigh:
    w0, c0 = clock()
    ev = torch.linalg.eigvalsh(H)
    w1, c1 = clock()
    out.update(eigvalsh_wall=w1 - w0, eigvalsh_cpu=c1 - c0, lambda_max=float(ev[-1]))
    del ev
    w0, c0 = clock()
    ev, V = torch.linalg.eigh(H)
    w1, c1 = clock()
    out.update(eigh_wall=w1 - w0, eigh_cpu=c1 - c0)
out["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
'''


def run_case(assembly: str, threads: int, rows: int, eigh: bool, timeout: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    before = os.times()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, assembly, str(rows), str(int(eigh))],
                              env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"assembly": assembly, "status": f"timed out after {timeout} s"}
    after = os.times()
    res = {"assembly": assembly, "process_wall": time.perf_counter() - t0,
           "process_cpu": (after.children_user - before.children_user)
           + (after.children_system - before.children_system)}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        res["status"] = f"failed: {proc.stderr.strip().splitlines()[-1:]}"
        return res
    res.update(json.loads(line[0][7:]), status="ok")
    return res


def _f(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def table(rows: list[dict], load: str) -> str:
    lines = ["# Exact Hessian + spectrum of the digits CNN (float64)", "",
             ("`bench/bench_exact_cnn.py`: one fresh subprocess per row; CPU = user + system "
             f"time of the subprocess; peak RSS = its ru_maxrss. Machine load at start: {load}."),
             "",
             ("| assembly | threads | p | n | H wall s | H CPU s | eigvalsh wall / CPU s | "
             "eigh wall / CPU s | process wall / CPU s | peak RSS MB (after H) | max rel err |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['assembly']} | | | | {r.get('status')} | | | | | | |")
            continue
        lines.append(
            f"| {r['assembly']} | {r['threads']} | {r['p']} | {r['n']} | {_f(r['hessian_wall'])} | "
            f"{_f(r['hessian_cpu'])} | {_f(r.get('eigvalsh_wall'))} / {_f(r.get('eigvalsh_cpu'))} | "
            f"{_f(r.get('eigh_wall'))} / {_f(r.get('eigh_cpu'))} | {_f(r['process_wall'])} / "
            f"{_f(r['process_cpu'])} | {r['rss_peak_mb']:.0f} ({r['rss_hessian_mb']:.0f}) | "
            f"{_f(r.get('max_rel_err'), '{:.1e}')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--columns", action="store_true", help="also the identity-column route")
    ap.add_argument("--rows", type=int, default=8, help="columns checked against the operator")
    ap.add_argument("--no-eigh", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(RESULTS / "exact_cnn.md"))
    args = ap.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for t in args.threads:
        for assembly in ["split"] + (["columns"] if args.columns else []):
            r = run_case(assembly, t, args.rows, not args.no_eigh, args.timeout)
            print(json.dumps(r), flush=True)
            rows.append(r)
    text = table(rows, load)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
