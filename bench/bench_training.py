"""Training speed of the reference 2-100-100-3 gauss model (SGD lr 0.02, batch 64, CE).

Cases: the reference-style loop (DataLoader with shuffle, per-epoch validation and test
forwards, as in the reference's train_and_validate) at the default 2 threads and at 1 thread;
hbk.boundary.train with the autograd engine; the stacked engine for one model and for 5 seeds
at once; and the demo schedule of demo_budget.md (width 50: normal 2k, random-label 40k,
adversarial 2k, large norm 1k epochs) for 3 seeds through train_setups with a cache.

Usage: python bench/bench_training.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402


def reference_loop(ds, epochs: int, threads: int) -> float:
    """The reference training loop (DataLoader, val and test forwards every epoch)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from hbkernels.boundary import make_model

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make_model("fnn2", 2, 3, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        loader = DataLoader(TensorDataset(ds.X_train, ds.y_train), batch_size=64, shuffle=True)
        t0 = time.perf_counter()
        for _ in range(epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb.float()), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                F.cross_entropy(model(ds.X_val), ds.y_val)
                F.cross_entropy(model(ds.X_test), ds.y_test)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, no demo schedule")
    args = ap.parse_args()

    import torch

    from hbkernels.boundary import (
        TrainConfig,
        load_dataset,
        make_model,
        train,
        train_batched,
        train_setups,
    )

    ds = load_dataset("gauss")
    E = 300 if args.quick else 2000
    rows = []

    def row(case: str, epochs: int, models: int, seconds: float, note: str = "") -> None:
        per_model = seconds / (epochs * models)
        rows.append({"case": case, "epochs": epochs, "models": models, "seconds": seconds,
                     "ms_per_epoch_per_model": 1e3 * per_model,
                     "epochs_per_s_per_model": 1 / per_model, "note": note})
        print(f"{case}: {1e3 * per_model:.3f} ms/epoch/model", flush=True)

    train(make_model("fnn2", 2, 3, seed=0), ds, TrainConfig(epochs=20))  # warm-up
    row("reference loop (DataLoader), 2 threads", E // 20, 1, reference_loop(ds, E // 20, 2))
    row("reference loop (DataLoader), 1 thread", E // 4, 1, reference_loop(ds, E // 4, 1))
    r = train(make_model("fnn2", 2, 3, seed=0), ds, TrainConfig(epochs=E, engine="autograd"))
    row("hbk train, autograd engine", E, 1, r.seconds, f"train acc {r.train_acc:.3f}")
    r = train(make_model("fnn2", 2, 3, seed=0), ds, TrainConfig(epochs=E, engine="stacked"))
    row("hbk train, stacked engine", E, 1, r.seconds, f"train acc {r.train_acc:.3f}")
    rs = train_batched([make_model("fnn2", 2, 3, seed=s) for s in range(5)], ds,
                       TrainConfig(epochs=E), seeds=range(5))
    row("hbk train_batched, 5 seeds", E, 5, rs[0].seconds,
        "train acc " + "/".join(f"{x.train_acc:.2f}" for x in rs))

    demo = None
    if not args.quick:
        eps = {"normal": 2000, "random-label": 40_000, "adversarial": 2000, "large-norm": 1000}
        seeds = [0, 1, 2]
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            parts = {}
            for setup in ("normal", "adversarial", "large-norm"):
                t = time.perf_counter()
                res = train_setups(setup, "gauss", seeds, width=50, epochs=eps, cache_dir=cache)
                parts[setup] = {"seconds": time.perf_counter() - t,
                                "train_acc": [x.train_acc for x in res],
                                "parent_train_acc": [x.info.get("parent", {}).get("train_acc")
                                                     for x in res],
                                "parent_param_norm": [x.info.get("parent", {}).get("param_norm")
                                                      for x in res]}
            total = time.perf_counter() - t0
        demo = {"seeds": seeds, "epochs": eps, "width": 50, "seconds": total,
                "seconds_per_seed": total / len(seeds), "phases": parts}
        rl_acc = parts["adversarial"]["parent_train_acc"]
        rl_norm = parts["adversarial"]["parent_param_norm"]
        row("demo schedule (w50, 45k epochs/seed), 3 seeds", sum(eps.values()), 3, total,
            f"{total / 3:.1f} s/seed; random-label train acc "
            + "/".join(f"{a:.2f}" for a in rl_acc) + ", norm "
            + "/".join(f"{n:.0f}" for n in rl_norm))

    base = rows[0]["ms_per_epoch_per_model"]
    for r_ in rows:
        r_["speedup_vs_reference"] = base / r_["ms_per_epoch_per_model"]
    meta = {"torch": torch.__version__, "threads_default": torch.get_num_threads(),
            "model": "fnn2 2-100-100-3 (10,703 params), gauss 150 train points, SGD 0.02, batch 64",
            "note": "2 shared cores, other developers working: timings are noisy"}
    name = "training_quick" if args.quick else "training"
    H.RESULTS.mkdir(parents=True, exist_ok=True)
    (H.RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                        "demo": demo}, indent=1))
    table = H.markdown_table(rows, [
        ("case", "case"), ("epochs", "epochs"), ("models", "models"), ("seconds", "s"),
        ("ms_per_epoch_per_model", "ms/epoch/model"), ("epochs_per_s_per_model", "epochs/s/model"),
        ("speedup_vs_reference", "x ref (2 thr)"), ("note", "note")])
    text = (f"# Training speed ({meta['model']})\n\n{meta['note']}; "
            f"command: python bench/bench_training.py{' --quick' if args.quick else ''}\n\n"
            f"{table}\n")
    (H.RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
