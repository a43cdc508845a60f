"""Per-sample products on CNNs and a transformer: one hbk pass against vmap(grad) + GEMMs.

All three products together (gradient norms, the (n, n) Gram, cosine alignment with k
vectors), labels = the model's predictions, float32:

* ``hbk``: one :func:`hbkernels.per_sample_products` call (norms, vectors, gram);
* ``hbk x3``: three separate calls (``gradient_norms``, ``gradient_gram``,
  ``gradient_alignment``), as before the one-pass engine;
* ``vmap``: ``torch.func`` ``vmap(grad)`` materialising G once, then ``|G|``, ``G G^T`` and
  ``G V`` (the strongest plain-PyTorch baseline measured in issue 14).

Timing: the tools are timed in interleaved rounds (hbk, hbk x3, vmap, hbk, ...) after one
warm-up call each; medians and min-max spread of ``--repeats`` rounds, at each of
``--threads``. Memory (``--memory``): each tool in a fresh subprocess, peak RSS above the set-up
(model, data and vectors built, one warm-up call on 16 samples, then VmHWM reset via
``/proc/self/clear_refs``): ``VmHWM - VmRSS`` around one call. Agreement: hbk against vmap,
max relative error of norms and Gram and max |dC| (float32).

    .venv/bin/python bench/bench_persample.py [--models lenet5,cnn,resnet,transformer,mlp]
        [--n 1024] [--threads 1,2] [--repeats 3] [--k 10] [--memory] [--json out.json]

:func:`run` returns the rows (dicts) for ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _harness as H
from models import make_case
from task_persample import vmap_grads

import hbkernels as hbk

MODELS = ["lenet5", "cnn", "resnet", "transformer", "mlp"]
TOOLS = ["hbk", "hbk x3", "vmap"]


def setup(model: str, n: int, k: int, seed: int = 0):
    """The benchmark case (briefly trained, eval mode), its inputs and k random vectors."""
    case = make_case(model, n=n, steps=20)
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(hbk.num_params(case.model), k, generator=gen)
    return case.model, case.X, V


def tool(name: str, model, X, V):
    """A zero-argument callable returning ``(norms, gram, alignment)``."""
    if name == "hbk":
        def f():
            r = hbk.per_sample_products(model, X, norms=True, vectors=V, gram=True)
            return r.norms, r.gram, r.alignment["vectors"]
    elif name == "hbk x3":
        def f():
            return (hbk.gradient_norms(model, X), hbk.gradient_gram(model, X),
                    hbk.gradient_alignment(model, X, V))
    elif name == "vmap":
        def f():
            with torch.no_grad():
                y = model(X).argmax(1)
            G = vmap_grads(model, X, y)
            nr = G.norm(dim=1)
            K = G @ G.T
            C = (G @ V) / (nr[:, None] * V.norm(dim=0)[None, :])
            return nr, K, torch.nan_to_num(C)
    else:
        raise ValueError(f"unknown tool {name!r}; expected one of {TOOLS}")
    return f


def agreement(a, b) -> dict[str, float]:
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
    return {"norms_rel": rel(a[0], b[0]), "gram_rel": rel(a[1], b[1]),
            "align_abs": float((a[2] - b[2]).abs().max())}


def time_models(models: list[str], n: int, k: int, threads: int, repeats: int,
                tools: list[str] = TOOLS) -> list[dict[str, Any]]:
    """Interleaved timing rows (one per model and tool) at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    rows = []
    for m in models:
        model, X, V = setup(m, n, k)
        fns = {t: tool(t, model, X, V) for t in tools}
        out = {t: f() for t, f in fns.items()}  # warm-up and answers
        agree = agreement(out["hbk"], out["vmap"]) if "vmap" in out and "hbk" in out else {}
        del out
        times: dict[str, list[float]] = {t: [] for t in tools}
        for _ in range(repeats):
            for t, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[t].append(time.perf_counter() - t0)
        for t in tools:
            ts = times[t]
            rows.append({"model": m, "p": hbk.num_params(model), "n": n, "k": k,
                         "threads": threads, "tool": t, "median_s": statistics.median(ts),
                         "min_s": min(ts), "max_s": max(ts), **(agree if t == "hbk" else {})})
    return rows


def peak_memory(model: str, tool_name: str, n: int, k: int, threads: int) -> float | None:
    """Peak RSS above the set-up of one call, in MB, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--memory-child", model, tool_name, str(n), str(k),
           str(threads)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200)
    for line in r.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    sys.stderr.write(r.stderr[-2000:])
    return None


def _memory_child(model: str, tool_name: str, n: int, k: int, threads: int) -> None:
    torch.set_num_threads(threads)
    mdl, X, V = setup(model, n, k)
    tool(tool_name, mdl, X[:16], V)()  # load the kernels
    if not H.reset_hwm():
        print("PEAK_MB nan")
        return
    base = H.current_rss_bytes()
    f = tool(tool_name, mdl, X, V)
    out = f()
    peak = H.hwm_bytes()
    del out
    print(f"PEAK_MB {(peak - base) / 2**20:.1f}")


def run(models: list[str] = MODELS, n: int = 1024, k: int = 10, threads: tuple[int, ...] = (1, 2),
        repeats: int = 3, memory: bool = True) -> list[dict[str, Any]]:
    """All rows: timing at each thread count, then (optionally) peak memory at one thread."""
    rows = []
    for th in threads:
        rows += time_models(models, n, k, th, repeats)
    if memory:
        for r in rows:
            if r["threads"] == threads[0]:
                r["peak_mb"] = peak_memory(r["model"], r["tool"], n, k, threads[0])
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per model and thread count, each tool's median (spread), speed-up over vmap,
    peak memory and its fraction of vmap's; targets: >= 2x and <= 1/4."""
    head = ("| model (p) | threads | tool | median s (min-max) | vmap / tool | peak MB | "
            "/ vmap peak | agreement |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["threads"], r["tool"]): r for r in rows}
    for r in rows:
        v = by.get((r["model"], r["threads"], "vmap"))
        vm = by.get((r["model"], rows[0]["threads"], "vmap"))
        speed = v["median_s"] / r["median_s"] if v else float("nan")
        mem = r.get("peak_mb")
        frac = (mem / vm["peak_mb"] if mem is not None and vm and vm.get("peak_mb") else None)
        agree = (f"norms {r['norms_rel']:.0e}, Gram {r['gram_rel']:.0e}, C {r['align_abs']:.0e}"
                 if "norms_rel" in r else "")
        lines.append(
            f"| {r['model']} ({r['p']:,}) | {r['threads']} | {r['tool']} | "
            f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {speed:.2f}x | "
            f"{'' if mem is None else f'{mem:.0f}'} | "
            f"{'' if frac is None else f'{frac:.2f}'} | {agree} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        m, t, n, k, th = sys.argv[2:7]
        _memory_child(m, t, int(n), int(k), int(th))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS[:4]))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="peak RSS per tool (subprocesses)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    models = a.models.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; expected among {MODELS}")
    rows = run(models, a.n, a.k, tuple(int(t) for t in a.threads.split(",")), a.repeats,
               a.memory)
    print(f"n = {a.n}, k = {a.k}, float32, median of {a.repeats} interleaved rounds; "
          f"load average {H.load_average()}")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
