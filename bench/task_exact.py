"""The exact Hessian: hbk.exact_hessian vs the paper's per-parameter double backward,
torch.autograd.functional.hessian and torch.func.hessian.

Ground truth: ``ROWS`` rows (spread evenly over the parameters) of the float64 Hessian by the
paper's method in float64 (one double backward per row). Every tool's answer is compared on
those rows: max |H_tool - H_true| / max |H_true| <= ``AGREE`` (float32 answers).
The paper's loop is timed on the same rows and extrapolated to p (times p / rows).
A tool whose estimated memory (p vectorised tangents through the graph) exceeds a quarter of
the free memory is not run: its row says so.
"""

from __future__ import annotations

import time

import _harness as H
import numpy as np
import torch
from models import Case, flat_loss_fn, make_case

AGREE = 1e-4


def _rows(p: int, r: int) -> np.ndarray:
    return np.unique(np.linspace(0, p - 1, r).astype(int))


def paper_rows(case: Case, idx: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The reference find_hessian (create_graph on every row, as the paper's code), on rows."""
    f, theta0 = flat_loss_fn(case, dtype)
    theta = theta0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    out = torch.empty(len(idx), theta.numel(), dtype=dtype)
    for j, i in enumerate(idx):
        (row,) = torch.autograd.grad(g[int(i)], theta, create_graph=True, retain_graph=True)
        out[j] = row.detach()
    return out


def graph_numel(case: Case) -> int:
    """Activation elements of one forward (for the vectorised anchors' memory estimate)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    hs = [m.register_forward_hook(hook) for m in case.model.modules()]
    try:
        with torch.no_grad():
            for x, _ in case.batches:
                case.model(x)
    finally:
        for h in hs:
            h.remove()
    return total


def tools(case: Case, idx: np.ndarray) -> list[H.Tool]:
    import hbkernels as hbk

    p = case.p
    est_gb = 4 * 4.0 * p * (graph_numel(case) + p) / 2**30  # p tangents x (graph + output)
    too_big = est_gb > 0.25 * H.available_bytes() / 2**30

    def hbk_exact():
        return lambda: hbk.exact_hessian(case.model, case.loss_fn, case.data)[idx]

    def paper():
        return lambda: paper_rows(case, idx, torch.float32)

    def afh():
        f, theta0 = flat_loss_fn(case)
        return lambda: torch.autograd.functional.hessian(f, theta0, vectorize=True)[idx]

    def tfh():
        f, theta0 = flat_loss_fn(case)
        return lambda: torch.func.hessian(f)(theta0)[idx]

    out = [
        H.Tool("hbk.exact_hessian", hbk_exact, ours=True, note="block HVPs on identity chunks"),
        H.Tool("paper: one double backward per parameter", paper, scale=p / len(idx),
               reference=True, note=f"timed on {len(idx)} rows, x p/{len(idx)}"),
    ]
    for name, make in (("torch.autograd.functional.hessian", afh), ("torch.func.hessian", tfh)):
        if too_big:
            out.append(H.Tool(name, _skip(f"not run: needs ~{est_gb:.0f} GB, over a quarter "
                                          "of the free memory"), note="vectorize=True"
                              if "autograd" in name else "jacfwd(jacrev)"))
        else:
            out.append(H.Tool(name, make, reference=True,
                              note="vectorize=True" if "autograd" in name else "jacfwd(jacrev)"))
    return out


def _skip(msg: str):
    def make():
        raise MemoryError(msg)
    return make


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        # the paper's n = 150 for its MLP; small batches for the costlier models
        kw = ({"n": 150} if name == "mlp" else {"n": 16} if name in ("cnn", "transformer")
              else {}) if scale == "full" else {}
        case = make_case(name, scale, **kw)
        idx = _rows(case.p, 100 if scale == "full" else 8)
        t0 = time.perf_counter()
        truth = paper_rows(case, idx, torch.float64)
        t_truth = time.perf_counter() - t0
        hmax = float(truth.abs().max())

        def check(ans, truth=truth, hmax=hmax):
            err = float((ans.double() - truth).abs().max()) / hmax
            return err <= AGREE, err, f"max abs err / max abs H {err:.1e}"

        rows += H.run_tools(tools(case, idx), check, repeats, task="exact",
                            case=f"{name} (p={case.p}, n={case.n})",
                            extra={"model": name, "p": case.p, "n": case.n, "truth_s": t_truth})
        for r in rows:  # a MemoryError raised on purpose is a skip, not a failure
            if "not run: needs" in r["status"]:
                r["status"] = r["status"].split("MemoryError: ", 1)[-1].rstrip(")")
        print(f"[exact] {name}: done", flush=True)
    return rows
