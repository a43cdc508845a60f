"""Per-sample speed on the paper MLP: this tree against commit e5a5820 (before the package).

Paper MLP 2-100-100-3 (ReLU), n = 4096: ``gradient_alignment`` with k = 25 vectors,
``gradient_norms`` and ``gradient_gram``; one torch thread; old and new interleaved, median of
``--repeats`` runs. Prints the median seconds and the ratios new / old (< 1: faster).

    .venv/bin/python bench/persample_regression.py [--repeats 7] [--dtype float32]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import hbkernels as hbk

BASE = "e5a5820"


def old_module():
    """hbkernels/persample.py of commit BASE, imported against today's hbkernels.ops."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{BASE}:hbkernels/persample.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from . import ops", "from hbkernels import ops")
    src = src.replace("from .params import", "from hbkernels.params import")
    path = Path(tempfile.mkdtemp()) / "persample_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("persample_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["persample_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 3)).to(dtype)
    X = torch.randn(a.n, 2, dtype=dtype)
    V = torch.randn(hbk.num_params(model), 25, dtype=dtype)
    old = old_module()
    cases = {
        "alignment k=25": lambda m: m.gradient_alignment(model, X, V),
        "norms": lambda m: m.gradient_norms(model, X),
        "gram": lambda m: m.gradient_gram(model, X),
    }
    for name, f in cases.items():  # same answers, and a warm-up
        a_old, a_new = f(old), f(hbk)
        err = float((a_old - a_new).abs().max() / a_old.abs().max())
        print(f"{name}: max relative difference old/new {err:.2e}")
    times = {(name, w): [] for name in cases for w in ("old", "new")}
    cpu = {(name, w): [] for name in cases for w in ("old", "new")}
    for _ in range(a.repeats):
        for name, f in cases.items():
            for w, m in (("old", old), ("new", hbk)):
                t0, c0 = time.perf_counter(), time.process_time()
                f(m)
                times[(name, w)].append(time.perf_counter() - t0)
                cpu[(name, w)].append(time.process_time() - c0)
    print(f"paper MLP 2-100-100-3, n={a.n}, {a.dtype}, {a.threads} thread(s), "
          f"median of {a.repeats}")
    print(f"{'product':<16} {'old s':>9} {'new s':>9} {'new/old':>8}   (CPU seconds: old, new, "
          "new/old; less sensitive to a loaded machine)")
    for name in cases:
        to, tn = (statistics.median(times[(name, w)]) for w in ("old", "new"))
        co, cn = (statistics.median(cpu[(name, w)]) for w in ("old", "new"))
        print(f"{name:<16} {to:9.4f} {tn:9.4f} {tn / to:8.3f}   {co:9.4f} {cn:9.4f} {cn / co:8.3f}")
    P0 = time.perf_counter()
    hbk.per_sample_products(model, X, norms=True, vectors=V, gram=True)
    one = time.perf_counter() - P0
    print(f"one pass (norms + alignment + gram): {one:.4f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
