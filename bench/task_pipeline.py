"""The paper pipeline: ``hbk reproduce table1`` for one dataset and seed, the training loop,
and the reference repository's timings quoted from ``shared/paper/reference_setup.md``
(section 10.2, measured there on this 2-core machine with torch 2.13; quoted, not run).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as H

# Quoted from reference_setup.md 10.2 / 12 (seconds; gauss, width 100, p = 10,703, 1 thread
# for training). One Table 1 seed = normal + random-label + adversarial + large norm training
# and the analysis (exact Hessian, eigh, G measure with all p eigenvectors) of 3 models.
REFERENCE = [
    ("training, normal (2,000 epochs at 3 ms/epoch)", 6.0),
    ("training, random-label pretraining (300,000 epochs at 3 ms/epoch)", 900.0),
    ("training, adversarial fine-tune (20,000 epochs)", 60.0),
    ("training, large norm (1,000 epochs)", 3.0),
    ("find_hessian (p double backwards), x3 models", 3 * 9.8),
    ("np.linalg.eigh of the p x p float32 Hessian (366 s), x3 models", 3 * 366.0),
    ("G measure: alignment with all p eigenvectors (3.3 s/sample, 150 samples), x3", 3 * 495.0),
]


def _hbk(*args: str, timeout: float = 1500) -> float:
    code = "import sys; from hbkernels.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError((out.stderr or out.stdout).strip().splitlines()[-1][:200])
    return dt


def table1_rows(scale: str) -> list[dict]:
    extra = [] if scale == "full" else ["--epochs-scale", "0.002", "--resolution", "8",
                                        "--margin-steps", "20", "--width", "8"]
    row = {"task": "pipeline", "case": "table1 gauss, 1 seed", "tool": "hbk reproduce table1",
           "ours": True, "status": H.OK, "reference": False,
           "note": "budget profile (width 50, float64 Hessian)" + (" smoke-sized" if extra
                                                                   else "")}
    with tempfile.TemporaryDirectory() as out:
        try:
            dt = _hbk("reproduce", "table1", "--datasets", "gauss", "--seeds", "1", "--out",
                      out, "--quiet", *extra)
            report = Path(out) / "table1" / "report.md"
            if not report.exists():
                raise RuntimeError(f"no {report.name} written")
            row.update(median_s=dt, repeats=1, ratio=1.0, accuracy_text="report.md written")
        except Exception as e:  # noqa: BLE001
            row["status"] = "FAIL (error: " + H.first_line(e) + ")"
    total = sum(s for _, s in REFERENCE)
    ref = {"task": "pipeline", "case": "table1 gauss, 1 seed", "tool":
           "reference repository (quoted, not run)", "ours": False, "status": H.OK,
           "median_s": total, "repeats": 0, "reference": False,
           "note": "reference profile (width 100, 300k random-label epochs), sum of the "
                   "quoted step timings below",
           "accuracy_text": "n/a (different budget)"}
    if row.get("median_s"):
        ref["ratio"] = total / row["median_s"]
    return [row, ref]


def training_rows(scale: str, repeats: int) -> list[dict]:
    """Training speed (from the former bench_training.py): the reference DataLoader loop vs
    hbk.boundary.train's engines; agreement = final train accuracy within 0.05 of the loop's."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from hbkernels.boundary import TrainConfig, load_dataset, make_model, train, train_batched

    ds = load_dataset("gauss")
    E = 300 if scale == "full" else 20
    ref_acc: dict = {}

    def acc(model) -> float:
        with torch.no_grad():
            return float((model(ds.X_train.float()).argmax(1) == ds.y_train).float().mean())

    def loop():
        def call():
            model = make_model("fnn2", 2, 3, seed=0)
            opt = torch.optim.SGD(model.parameters(), lr=0.02)
            loader = DataLoader(TensorDataset(ds.X_train, ds.y_train), batch_size=64,
                                shuffle=True, generator=torch.Generator().manual_seed(0))
            for _ in range(E):
                for xb, yb in loader:
                    loss = F.cross_entropy(model(xb.float()), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():  # the reference validates and tests every epoch
                    F.cross_entropy(model(ds.X_val), ds.y_val)
                    F.cross_entropy(model(ds.X_test), ds.y_test)
            ref_acc.setdefault("acc", acc(model))
            return acc(model)
        return call

    def engine(name):
        def make():
            return lambda: train(make_model("fnn2", 2, 3, seed=0), ds,
                                 TrainConfig(epochs=E, engine=name)).train_acc
        return make

    def batched():
        return lambda: min(r.train_acc for r in train_batched(
            [make_model("fnn2", 2, 3, seed=s) for s in range(5)], ds, TrainConfig(epochs=E),
            seeds=range(5)))

    def check(a):
        ok = a >= ref_acc.get("acc", 0.0) - 0.05
        return ok, float(a), f"train acc {a:.3f} (loop {ref_acc.get('acc', float('nan')):.3f})"

    tools = [H.Tool("reference loop (DataLoader, val+test every epoch)", loop, reference=True,
                    note=f"{E} epochs"),
             H.Tool("hbk train, autograd engine", engine("autograd"), note=f"{E} epochs"),
             H.Tool("hbk train, stacked engine", engine("stacked"), ours=True,
                    note=f"{E} epochs"),
             H.Tool("hbk train_batched, 5 seeds (time / 5)", batched, scale=0.2,
                    note=f"{E} epochs x 5 models")]
    return H.run_tools(tools, check, repeats, task="training",
                       case=f"gauss fnn2 2-100-100-3, {E} epochs")


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    rows = training_rows(scale, repeats)
    print("[pipeline] training: done", flush=True)
    rows += table1_rows(scale)
    print("[pipeline] table1: done", flush=True)
    return rows
