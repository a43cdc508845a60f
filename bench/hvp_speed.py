"""HVP speed of the current core against an older commit (default e5a5820), side by side.

Each implementation runs in its own subprocess (the old tree is copied as a package named
``hbk_old`` next to the same compiled extension), interleaved over several rounds, one torch
thread (the CNN's ``auto`` is the closed-form ``conv_chain`` since 11999f4; methods a tree lacks
are skipped); the table gives the median over rounds of the fastest product of each round and the ratio new / old.

    python bench/hvp_speed.py [--commit e5a5820] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import importlib, json, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
hbk = importlib.import_module(sys.argv[1])
torch.set_num_threads(1)

def mlp_case():
    rs = np.random.RandomState(42)
    means, stds = [(2, -1), (-2, 0), (0, 2)], [(0.5, 0.5), (0.5, 1.0), (0.5, 0.5)]
    X = np.concatenate([rs.normal(m, s, size=(334, 2)) for m, s in zip(means, stds)])[:1000]
    y = np.repeat([0, 1, 2], 334)[:1000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 3))
    return model, torch.tensor(X, dtype=torch.float32), torch.tensor(y)

def cnn_case():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    return model, X, y

out = {}
for case, make, methods in (("mlp", mlp_case, ("auto", "double_backward", "forward_over_reverse")),
                            ("cnn", cnn_case, ("auto", "double_backward", "forward_over_reverse",
                                               "conv_chain"))):
    model, X, y = make()
    for method in methods:
        try:
            op = hbk.HessianOperator(model, F.cross_entropy, (X, y), method=method)
        except ValueError:  # a method the other tree does not have
            continue
        p = op.dim
        for b in (1, 8):
            V = torch.randn(p, b, generator=torch.Generator().manual_seed(1))
            if b == 1:
                V = V[:, 0]
            op.matvec(V); op.matvec(V)  # warm-up (graph, caches, trial products of the old auto)
            ts = []
            for _ in range(15 if b == 1 else 5):  # the fastest of several: the machine is shared
                t0 = time.perf_counter()
                op.matvec(V)
                ts.append(time.perf_counter() - t0)
            out[f"{case} {method} b={b}"] = min(ts)
print(json.dumps(out))
'''


def old_tree(commit: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="hbk_old_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "hbkernels"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    import hbkernels._build_info as info  # the compiled files live beside it (editable installs)

    built = Path(info.__file__).parent
    for f in [*built.glob("_C*.so"), built / "_build_info.py"]:
        shutil.copy(f, tmp / "hbkernels")
    (tmp / "hbkernels").rename(tmp / "hbk_old")
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", default="e5a5820")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    old = old_tree(args.commit)
    runs: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    env_old = {**os.environ, "PYTHONPATH": str(old), "OMP_NUM_THREADS": "1"}
    env_new = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(args.rounds):
        for impl, mod, env in (("old", "hbk_old", env_old), ("new", "hbkernels", env_new)):
            res = subprocess.run([sys.executable, "-c", WORKER, mod], env=env, cwd=tempfile.gettempdir(),
                                 capture_output=True, text=True, check=True)
            for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                runs[impl].setdefault(k, []).append(v)
    shutil.rmtree(old)
    print(f"| case (1 thread, median of {args.rounds} rounds of min) | {args.commit} s/product | now s/product | now / old |")
    print("|---|---|---|---|")
    for k in runs["new"]:
        n = statistics.median(runs["new"][k])
        if k not in runs["old"]:
            print(f"| {k} | - | {n:.4g} | - |")
            continue
        o = statistics.median(runs["old"][k])
        print(f"| {k} | {o:.4g} | {n:.4g} | {n / o:.2f} |")


if __name__ == "__main__":
    main()
