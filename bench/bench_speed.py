"""Issue 11's speed table: HVP cost, time outside HVPs, hbk against the other solvers.

For the paper MLP (2-100-100-3, n = 1000), LeNet-5 (3x32x32, 10 classes), the paper's MNIST
CNN (1x28x28, 3 classes) and a small transformer encoder classifier (bench/models.py), one
torch thread unless ``--threads``:

* ``grad``: one plain ``loss.backward()`` over the data; ``HVP``: one ``HessianOperator``
  product (method ``auto``), and per vector in a block of 8;
* ``hbk top-k``: the whole ``hbk.hessian_eigs`` call split into operator set-up (Objective:
  data conversion, the determinism check's two gradient passes, the method choice), time in
  HVPs (timed around the product strategy) and the rest (the driver);
* ``eigsh (our op)``: scipy ARPACK on ``HessianOperator.to_scipy()``; ``curvlinops + eigsh``,
  ``hessian-eigenthings lanczos`` (max_iter = hbk's HVP count), ``PyHessian`` (power
  iteration, maxIter 100) where installed, a note where not.

Accuracy: every solver's top-k eigenvalues against hbk's float64-HVP answer (tol 1e-8), as the
largest relative error ``|l - l_ref| / max(|l_ref|, 1e-2 |l_1|)``; hbk's operator is tested
against ``torch.autograd.functional.hessian`` (tests/test_hvp.py), curvlinops' HVP is wrong on
LayerNorm models under torch 2.13 (its jvp(jacrev) route), so its transformer error is real.
Repeats are interleaved (tool A, B, C, A, B, C, ...); the table gives the median and
``[min-max]``. ``--exact-cnn`` runs the digits CNN exact Hessian + spectrum in a 2-thread
subprocess and reports its time and peak RSS.

    python bench/bench_speed.py [--models mlp,lenet5,cnn,transformer] [--k 10] [--repeats 3]
        [--n-lenet 512] [--skip pyhessian] [--exact-cnn] [--exact-timeout 600] [--json out.json]
    python bench/bench_speed.py --compiled --models lenet5,transformer --n 128   # compiled HVP
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import Case, make_case

import hbkernels as hbk

TOL = 1e-6
SIZES = {"mlp": (999, None), "lenet5": (512, None), "cnn": (256, None), "transformer": (256, None)}


def _med(ts: list[float]) -> str:
    if not ts:
        return "-"
    m = statistics.median(ts)
    return f"{m:.3g} [{min(ts):.3g}-{max(ts):.3g}]" if len(ts) > 1 else f"{m:.3g}"


def _loss_module(case: Case) -> torch.nn.Module:
    return torch.nn.MSELoss() if case.loss_fn is torch.nn.functional.mse_loss else \
        torch.nn.CrossEntropyLoss()


def grad_time(case: Case) -> float:
    model = case.model
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    for x, y in case.batches:
        (case.loss_fn(model(x), y) * (x.shape[0] / case.n)).backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def hvp_times(op: hbk.HessianOperator, block: int = 8) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.dim, generator=g, dtype=op.dtype)
    V = torch.randn(op.dim, block, generator=g, dtype=op.dtype)
    op @ v
    t0 = time.perf_counter()
    op @ v
    t1 = time.perf_counter()
    op @ V
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / block


def timed_hbk(case: Case, k: int, dtype: torch.dtype, tol: float = TOL,
              check: bool = True) -> dict:
    """One hessian_eigs call split into set-up / HVPs / rest."""
    t0 = time.perf_counter()
    op = hbk.HessianOperator(case.model, case.loss_fn, case.data, dtype=dtype,
                             check_deterministic=check)
    t1 = time.perf_counter()
    inner = op.strategy.apply
    spent = [0.0]

    def apply(V):
        s = time.perf_counter()
        out = inner(V)
        spent[0] += time.perf_counter() - s
        return out

    op.strategy.apply = apply
    res = hbk.eigs(op, k, tol=tol, seed=0)
    t2 = time.perf_counter()
    total = t2 - t0
    return {"total": total, "setup": t1 - t0, "hvp": spent[0], "hvps": int(res.num_matvecs),
            "outside": total - spent[0], "driver": res.overhead_fraction, "vals": res.eigenvalues.double().cpu().numpy(),
            "method": op.method, "converged": int(res.num_converged)
            if hasattr(res, "num_converged") else None}


def eigsh_ours(case: Case, k: int) -> np.ndarray:
    import scipy.sparse.linalg as sla

    op = hbk.HessianOperator(case.model, case.loss_fn, case.data)
    v0 = np.random.RandomState(0).randn(op.dim)
    w = sla.eigsh(op.to_scipy(), k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
    return np.sort(w)[::-1]


def curvlinops_eigsh(case: Case, k: int) -> np.ndarray:
    import scipy.sparse.linalg as sla
    from curvlinops import HessianLinearOperator

    params = [q for q in case.model.parameters() if q.requires_grad]
    A = HessianLinearOperator(case.model, _loss_module(case), params, case.batches,
                              check_deterministic=False).to_scipy(np.float32)
    v0 = np.random.RandomState(0).randn(case.p).astype(np.float32)
    return np.sort(sla.eigsh(A, k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False))[::-1]


def eigenthings(case: Case, k: int, hvps: int) -> np.ndarray:
    import hessian_eigenthings as he

    op = he.HessianOperator(case.model, case.loader(), he.supervised_loss(case.loss_fn))
    m = min(case.p - 1, max(2 * k, hvps))
    r = he.lanczos(op, k=k, max_iter=m, tol=TOL, which="LA", seed=0, reorthogonalize=True)
    return np.sort(np.asarray(r.eigenvalues, dtype=np.float64))[::-1]


def pyhessian(case: Case, k: int) -> np.ndarray:
    from pyhessian import hessian

    hs = hessian(case.model, _loss_module(case), data=(case.X, case.y), cuda=False)
    torch.manual_seed(0)
    vals, _ = hs.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
    return np.sort(np.asarray(vals, dtype=np.float64))[::-1]


def rel_err(vals: np.ndarray, ref: np.ndarray) -> float:
    scale = np.maximum(np.abs(ref), 1e-2 * abs(ref[0]))
    v = np.sort(np.asarray(vals, dtype=np.float64))[::-1][:ref.size]
    return float(np.max(np.abs(v - ref) / scale)) if v.size == ref.size else float("inf")


def installed(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def bench_model(name: str, k: int, repeats: int, skip: set[str], n: int | None) -> list[str]:
    case = make_case(name, "full", n=n or SIZES[name][0])
    lines = [(f"### {case.description} (p = {case.p:,}, n = {case.n}, top-{k}, "
             f"{torch.get_num_threads()} thread(s))"), ""]
    ref = timed_hbk(case, k, torch.float64, tol=1e-8)
    op = hbk.HessianOperator(case.model, case.loss_fn, case.data)
    tg, th, tb = [], [], []
    for _ in range(max(3, repeats)):
        tg.append(grad_time(case))
        h1, hb = hvp_times(op)
        th.append(h1)
        tb.append(hb)
    del op
    g, h = statistics.median(tg), statistics.median(th)
    lines += [(f"grad {_med(tg)} s; HVP ({ref['method']}) {_med(th)} s = **{h / g:.2f} "
              f"gradients**; per vector in a block of 8: {_med(tb)} s "
              f"({statistics.median(tb) / h:.2f}x a single product)"), ""]
    tools: dict[str, list] = {"hbk f32": [], "hbk f64": [], "hbk f32 no check": []}
    tools["eigsh (our op)"] = []
    avail = {"curvlinops + eigsh": "curvlinops", "hessian-eigenthings lanczos":
             "hessian_eigenthings", "PyHessian (tol 1e-3)": "pyhessian"}
    notes = []
    for t, mod in avail.items():
        if mod in skip or t.split()[0].lower() in skip:
            notes.append(f"{t}: skipped (--skip)")
        elif not installed(mod):
            notes.append(f"{t}: not installed")
        else:
            tools[t] = []
    errs: dict[str, float] = {}
    extra: dict[str, list] = {}
    for _ in range(repeats):
        for t, times in tools.items():
            t0 = time.perf_counter()
            if t.startswith("hbk"):
                r = timed_hbk(case, k, torch.float64 if t == "hbk f64" else torch.float32,
                              check="no check" not in t)
                vals = r["vals"]
                extra.setdefault(t, []).append(r)
            elif t == "eigsh (our op)":
                vals = eigsh_ours(case, k)
            elif t.startswith("curvlinops"):
                vals = curvlinops_eigsh(case, k)
            elif t.startswith("hessian-eigenthings"):
                vals = eigenthings(case, k, ref["hvps"])
            else:
                vals = pyhessian(case, k)
            times.append(time.perf_counter() - t0)
            errs[t] = max(errs.get(t, 0.0), rel_err(vals, ref["vals"]))
    base = statistics.median(tools["hbk f32"])
    lines += [("| solver | s (median [min-max]) | / hbk f32 | max rel eig err vs hbk f64 tol 1e-8 |"
              " set-up s | in HVPs s | outside HVPs / call | outside HVPs / driver | HVPs |"
              " ms/HVP in the solve |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t, ts in tools.items():
        row = f"| {t} | {_med(ts)} | {statistics.median(ts) / base:.2f} | {errs[t]:.1e} |"
        if t in extra:
            rs = extra[t]
            row += (f" {_med([r['setup'] for r in rs])} | {_med([r['hvp'] for r in rs])} | "
                    f"{_med([r['outside'] / r['total'] for r in rs])} | "
                    f"{_med([r['driver'] for r in rs])} | {rs[0]['hvps']} | "
                    f"{_med([1e3 * r['hvp'] / r['hvps'] for r in rs])} |")
        else:
            row += " | | | | | |"
        lines.append(row)
    lines += [""] + [f"* {x}" for x in notes] + [""]
    return lines


def compiled_line(name: str, n: int | None, hvps: int = 30) -> str:
    """method="compiled" against the auto method: compile time (the first product) and what a
    solve of ``hvps`` products costs with each."""
    case = make_case(name, "full", n=n or SIZES[name][0])
    v = torch.randn(case.p, generator=torch.Generator().manual_seed(1))
    auto = hbk.HessianOperator(case.model, case.loss_fn, case.data)
    te = []
    for _ in range(4):
        t0 = time.perf_counter()
        auto @ v
        te.append(time.perf_counter() - t0)
    te = te[1:]
    comp = hbk.HessianOperator(case.model, case.loss_fn, case.data, method="compiled")
    err = float((comp @ v - auto @ v).norm() / (auto @ v).norm())
    first = comp.strategy.compile_seconds
    tc = []
    for _ in range(3):
        t0 = time.perf_counter()
        comp @ v
        tc.append(time.perf_counter() - t0)
    e, c = statistics.median(te), statistics.median(tc)
    return (f"* **compiled HVP**, {case.description} (p = {case.p:,}): first product (compile) "
            f"{first:.1f} s; then {_med(tc)} s per product vs {_med(te)} s ({auto.method}), "
            f"relative difference {err:.1e}; a {hvps}-HVP solve: compiled {first + (hvps - 1) * c:.1f} s "
            f"vs {hvps * e:.1f} s ({auto.method}): "
            f"{'compiled faster' if first + (hvps - 1) * c < hvps * e else 'auto faster'}")


EXACT = r'''
import resource, sys, time, torch, torch.nn.functional as F
import hbkernels as hbk
from hbkernels.boundary.models import CNN
from sklearn.datasets import load_digits
d = load_digits(); m = d.target < 3
X = torch.tensor(d.images[m], dtype=torch.float64)[:, None] / 16; y = torch.tensor(d.target[m])
torch.manual_seed(0)
model = CNN((1, 8, 8), 3).double().eval()
t0 = time.perf_counter()
w, _ = hbk.hessian_spectrum(model, F.cross_entropy, (X, y))
dt = time.perf_counter() - t0
print(sum(q.numel() for q in model.parameters()), X.shape[0], dt,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float(w[0]))
'''


def exact_cnn(timeout: int) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", EXACT], env=env, capture_output=True,
                             text=True, timeout=timeout, check=True).stdout.split()
    except subprocess.TimeoutExpired:
        return [f"digits CNN exact Hessian + spectrum (2 threads): > {timeout} s (timed out)", ""]
    p, n, dt, rss, l1 = out[-5:]
    return [(f"digits CNN (p = {p}, n = {n}) exact Hessian + spectrum, 2 threads: {float(dt):.1f} s "
            f"(process {time.perf_counter() - t0:.1f} s), peak RSS {float(rss):.0f} MB, "
            f"lambda_1 = {float(l1):.5g}"), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,lenet5,cnn,transformer")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-lenet", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="samples for every model")
    ap.add_argument("--skip", default="", help="comma list: curvlinops,hessian_eigenthings,pyhessian")
    ap.add_argument("--exact-cnn", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="only method='compiled' vs auto per model (compile time over a 30-HVP solve)")
    ap.add_argument("--exact-timeout", type=int, default=600)
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    lines = [(f"# bench_speed (torch {torch.__version__}, load {os.getloadavg()[0]:.1f}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"), ""]
    for name in [m for m in args.models.split(",") if m]:
        n = args.n_lenet if name == "lenet5" and args.n_lenet else args.n
        block = ([compiled_line(name, n)] if args.compiled else
                 bench_model(name, args.k, args.repeats, skip, n))
        print("\n".join(block), flush=True)
        lines += block
    if args.exact_cnn:
        block = exact_cnn(args.exact_timeout)
        print("\n".join(block), flush=True)
        lines += block
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
