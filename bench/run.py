"""The benchmark suite: every task, every anchor, one RESULTS.md.

Usage:
    python bench/run.py                 # full run (make bench): bench/RESULTS.md, bench/results/
    python bench/run.py --smoke         # tiny sizes, < 2 min (make bench-smoke, the test suite)
    python bench/run.py --tasks eigen --models mlp cnn
    python bench/run.py --device cuda   # the GPU run (bench/gpu_check.sh)

Each task runs in a fresh subprocess (its own peak memory, no state shared between tasks) and
writes ``<out>/results/<task>.json``; the driver then writes ``<out>/RESULTS.md`` and the
scaling plots. Anchors that are not installed give rows that say so (``make bench`` installs
them: ``python bench/install_anchors.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H

TASKS = {
    # task: (module, full models, smoke models)
    "eigen": ("task_eigen", ["mlp", "cnn", "lenet5", "resnet", "transformer", "mlpreg"],
              ["mlp", "transformer", "mlpreg"]),
    "exact": ("task_exact", ["mlp", "cnn", "transformer", "mlpreg"], ["mlp", "mlpreg"]),
    "persample": ("task_persample", ["mlp", "cnn", "lenet5", "resnet", "transformer"],
                  ["mlp", "cnn", "resnet", "transformer"]),
    "trace": ("task_trace", ["mlp", "mlpreg"], ["mlp", "mlpreg"]),
    "pipeline": ("task_pipeline", [], []),
    "scaling": ("task_scaling", [], []),
}
ANCHORS = ["scipy", "PyHessian", "hessian-eigenthings", "curvlinops-for-pytorch",
           "backpack-for-pytorch", "opacus"]
TITLES = {
    "eigen": "Top-k Hessian eigenpairs",
    "exact": "Exact Hessian",
    "persample": "Per-sample gradient alignment, norms and Gram",
    "trace": "Hessian trace",
    "density": "Spectral density (SLQ)",
    "training": "Training loop (paper MLP)",
    "pipeline": "The paper pipeline (Table 1, one dataset and seed)",
    "kernels": "Dense kernels vs plain torch",
}


def worker(task: str, scale: str, repeats: int, models: list[str], out: Path,
           threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mod = __import__(TASKS[task][0])
    meta_start = H.machine_meta()
    t0 = time.perf_counter()
    rows = mod.run(scale, repeats, models)
    meta = meta_start | {"wall_s": time.perf_counter() - t0,
                         "load_average_end": H.load_average(), "scale": scale,
                         "repeats": repeats, "models": models}
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{task}.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                             indent=1, default=str))


def run_task(task: str, args, out: Path) -> dict:
    models = args.models or TASKS[task][2 if args.smoke else 1]
    cmd = [sys.executable, __file__, "--worker", task, "--out", str(out), "--repeats",
           str(args.repeats), "--threads", str(args.threads)]
    if models:
        cmd += ["--models", *models]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    env = dict(os.environ, HBK_BENCH_DEVICE=args.device)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.task_timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"{task}: timed out after {args.task_timeout:.0f} s", flush=True)
        return {"task": task, "error": f"timed out after {args.task_timeout:.0f} s",
                "wall_s": time.perf_counter() - t0}
    dt = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        print("  " + line, flush=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{task}: worker failed: {err}", flush=True)
        return {"task": task, "error": err, "stderr": proc.stderr[-4000:], "wall_s": dt}
    data = json.loads((out / "results" / f"{task}.json").read_text())
    print(f"{task}: {len(data['rows'])} rows in {dt:.0f} s", flush=True)
    return data


# ----------------------------------------------------------------------------- report
def _ratio_summary(rows: list[dict]) -> list[dict]:
    """Per case: our time, the fastest agreeing anchor, and ours vs every agreeing anchor."""
    out = []
    cases: dict = {}
    for r in rows:
        if r.get("tool") and r["task"] not in ("pipeline",):
            cases.setdefault((r["task"], r["case"]), []).append(r)
    for (task, case), rs in cases.items():
        ours = next((r for r in rs if r["ours"]), None)
        others = [r for r in rs if not r["ours"] and r["status"] == H.OK and r.get("ratio")
                  and not r["tool"].startswith("hbk")]
        if ours is None:
            continue
        best = min(others, key=lambda r: r["median_s"], default=None)
        out.append({"task": task, "case": case,
                    "ours": f"{ours['median_s']:.3g} s" if ours["status"] == H.OK
                    else ours["status"],
                    "fastest other": best["tool"] if best else "",
                    "its time / ours": f"{best['ratio']:.2f}" if best else "",
                    "slowest agreeing / ours": f"{max(r['ratio'] for r in others):.1f}"
                    if others else ""})
    return out


def _reading(rows: list[dict]) -> list[str]:
    """Plain statements generated from the numbers: where we lose, where we fail."""
    lines = []
    for r in rows:
        if r.get("ours") and r["status"] != H.OK and r.get("tool"):
            lines.append(f"* **Ours fails** on {r['task']} / {r['case']}: {r['status']}.")
    losses = [r for r in rows if r.get("tool") and not r["ours"] and r["status"] == H.OK
              and not r["tool"].startswith("hbk")
              and r.get("ratio") is not None and r["ratio"] < 1.0 and r["task"] != "pipeline"]
    for r in sorted(losses, key=lambda r: r["ratio"]):
        lines.append(f"* **We lose** on {r['task']} / {r['case']}: {r['tool']} takes "
                     f"{r['ratio']:.2f}x our time.")
    fails = [r for r in rows if r.get("tool") and not r["ours"] and r["status"].startswith("FAIL")]
    if fails:
        lines.append(f"* {len(fails)} anchor rows fail (an error or an answer that disagrees "
                     "with the ground truth); each row names the reason.")
    missing = sorted({r["status"] for r in rows if r.get("status", "").startswith("not inst")})
    if missing:
        lines.append("* Not installed here: " + ", ".join(missing) + " (run `make bench`).")
    return lines


def _scaling_md(points: list[dict]) -> str:
    view = []
    for q in points:
        v = {"axis": q["axis"], "op": q["op"], "n": q["n"], "p": q["p"], "k": q["k"],
             "hbk s": q["hbk_s"], "limit s": q.get("limit_s"),
             "hbk / limit": q["hbk_s"] / q["limit_s"] if q.get("limit_s") else None,
             "vmap s": q.get("vmap_s"), "hbk MB": q.get("hbk_mb"), "output MB": q["out_mb"],
             "dense G MB": q["dense_g_mb"]}
        if q["op"] == "lanczos":
            v["note"] = (f"{q['hvps']} HVPs of {q['hvp_s'] * 1e3:.2f} ms; "
                         f"{q['in_hvp_s'] / q['hbk_s']:.0%} of the time in HVPs")
        elif "agrees" in q:
            v["note"] = ("agrees with vmap" if q["agrees"] else "FAIL: differs from vmap") + \
                f" ({q['err']:.1e})"
        view.append(v)
    cols = [(c, c) for c in ("axis", "op", "n", "p", "k", "hbk s", "limit s", "hbk / limit",
                             "vmap s", "hbk MB", "output MB", "dense G MB", "note")]
    return H.markdown_table(view, cols)


def write_report(results: dict[str, dict], out: Path, args, wall: float) -> Path:
    rows, metas, errors = [], {}, []
    for task, data in results.items():
        if "error" in data:
            errors.append(f"* task **{task}** did not complete: `{data['error']}`")
            continue
        metas[task] = data["meta"]
        rows += data["rows"]
    plots, points = [], [r for r in rows if r.get("task") == "scaling"]
    rows = [r for r in rows if r.get("task") != "scaling"]
    if points:
        import task_scaling

        (out / "results").mkdir(parents=True, exist_ok=True)
        plots = task_scaling.plot(points, out / "results")
    meta = next(iter(metas.values()), H.machine_meta())
    label = "SMOKE RUN (tiny sizes: the numbers test the harness, not the speed)" \
        if args.smoke else "full run"
    md = [f"# hbkernels benchmark results ({label})", "",
          (f"Generated by `python bench/run.py{' --smoke' if args.smoke else ''}` "
           f"(`make bench{'-smoke' if args.smoke else ''}`) in {wall:.0f} s. Every row is "
           "checked against a ground truth in the same run: a row that disagrees says FAIL "
           "instead of a speed. Times are medians of interleaved repeats (tool A, B, C, A, B, "
           "C, ...) after one warm-up call, with the half-range in percent; peak memory is the "
           "process's peak RSS above the RSS before the call (VmHWM). Ratios are a tool's time "
           "over ours (> 1: we are faster)."), "",
          "## Environment", "",
          f"* torch {meta.get('torch')}, {meta.get('threads')} torch thread(s), "
          f"{meta.get('cores')} cores: {meta.get('cpu')}"
          + (f", GPU {meta['gpu']}" if meta.get("gpu") else ""),
          f"* commit {meta.get('commit')}, python {meta.get('python')}, {meta.get('date')}",
          "* load average (1, 5, 15 min) at the start and end of each task: "
          + "; ".join(f"{t} {m.get('load_average')} -> {m.get('load_average_end')}"
                      for t, m in metas.items()),
          "* anchors: " + ", ".join(f"{k} {v}" for k, v in H.package_versions(ANCHORS).items()),
          "* the machine is shared with other jobs: treat ratios below ~1.5x as ties.", ""]
    if errors:
        md += ["## Tasks without results", ""] + errors + [""]
    md += ["## Headline", "", H.markdown_table(_ratio_summary(rows), [
        ("task", "task"), ("case", "case"), ("ours", "ours"),
        ("fastest other", "fastest agreeing other tool"), ("its time / ours", "its time / ours"),
        ("slowest agreeing / ours", "slowest agreeing / ours")]), ""]
    md += ["## Reading", ""] + (_reading(rows) or ["* Ours is fastest in every row."]) + [
        ("* PyHessian and hessian-eigenthings' power iterations find the largest |lambda|: on "
         "models with a negative eigenvalue larger in magnitude than the k-th positive one "
         "they return different eigenpairs, and the row says FAIL."),
        ("* The paper pipeline compares our budget profile with the reference repository's "
         "quoted timings for its own (larger) profile: it shows the order of magnitude of a "
         "user's wait, not a like-for-like speed-up."), ""]
    docs = {t: (__import__(m).__doc__ or "").strip() for t, (m, _, _) in TASKS.items()}
    order = ["eigen", "exact", "persample", "trace", "density", "training", "pipeline",
             "kernels"]
    for task in order:
        trs = [r for r in rows if r.get("task") == task]
        if not trs:
            continue
        md += [f"## {TITLES[task]}", ""]
        if task in docs:
            md += [docs[task], ""]
        md += [H.tool_table(trs), ""]
        if task == "pipeline":
            import task_pipeline

            md += [("Reference timings quoted from `shared/paper/reference_setup.md` 10.2 "
                    "(not run here):"), "",
                   H.markdown_table([{"step": s, "seconds": v} for s, v in
                                     task_pipeline.REFERENCE], [("step", "step"),
                                                                ("seconds", "seconds")]), ""]
    if points:
        md += ["## Scaling", "", docs["scaling"], ""]
        md += [f"![{p}](results/{p})" for p in plots]
        md += ["", _scaling_md(points), ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (< 2 min)")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--models", nargs="+", default=None, help="override the task's models")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per tool after the warm-up (default 3; smoke 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU run)")
    ap.add_argument("--out", default=None,
                    help="output directory (default bench/, smoke: build/bench-smoke)")
    ap.add_argument("--task-timeout", type=float, default=600,
                    help="seconds per task before it is recorded as timed out (default 600)")
    ap.add_argument("--report-only", action="store_true",
                    help="write RESULTS.md from the task results already in <out>/results "
                         "(tasks without results are listed as not run)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    out = Path(args.out) if args.out else (H.ROOT / "build" / "bench-smoke" if args.smoke
                                           else H.BENCH)
    out.mkdir(parents=True, exist_ok=True)
    scale = "smoke" if args.smoke else "full"
    if args.worker:
        worker(args.worker, scale, args.repeats, args.models or [], out, args.threads)
        return 0
    t0 = time.perf_counter()
    results = {}
    if args.report_only:
        for task in args.tasks:
            f = out / "results" / f"{task}.json"
            results[task] = (json.loads(f.read_text()) if f.exists() else
                             {"task": task, "error": "not run in this run (time budget)"})
        wall = sum(d.get("meta", {}).get("wall_s", 0.0) for d in results.values())
        path = write_report(results, out, args, wall)
        print(f"wrote {path} from the saved task results")
        return 0
    for task in args.tasks:
        print(f"== {task}", flush=True)
        results[task] = run_task(task, args, out)
    path = write_report(results, out, args, time.perf_counter() - t0)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 1 if any("error" in d for d in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
