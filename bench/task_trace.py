"""Hessian trace and spectral density, every tool with the same number of HVPs.

Trace: hbk.hessian_trace (Hutch++ and Hutchinson), PyHessian ``trace`` (tol 0 so it runs all
its iterations), curvlinops ``hutchinson_trace`` / ``hutchpp_trace``, hessian-eigenthings
``trace``. Ground truth: the trace of the exact float64 Hessian. Agreement: the error is at
most 4 standard deviations of a Hutchinson estimate with the same probe count
(``sqrt(2 (|H|_F^2 - sum H_ii^2) / m)``, computed from the exact matrix).

Density (stochastic Lanczos quadrature, ``PROBES`` probes x ``STEPS`` steps): hbk.spectral_density,
PyHessian ``density``, curvlinops ``lanczos_approximate_spectrum``, hessian-eigenthings
``spectral_density``. Ground truth: the exact eigenvalues. Agreement: the Wasserstein-1
distance between the tool's spectral measure and the exact one, divided by the spectral
range, is at most 0.05.
"""

from __future__ import annotations

import _harness as H
import numpy as np
import torch
from models import Case, make_case
from torch import nn

W1_AGREE = 0.05


def _loss_module(case: Case) -> nn.Module:
    return nn.MSELoss() if case.loss_fn is torch.nn.functional.mse_loss else nn.CrossEntropyLoss()


def _pyhessian(case: Case):
    from pyhessian import hessian

    crit = _loss_module(case)
    if len(case.batches) == 1:
        return hessian(case.model, crit, data=(case.X, case.y), cuda=False)
    return hessian(case.model, crit, dataloader=case.loader(), cuda=False)


def _he_op(case: Case):
    import hessian_eigenthings as he

    return he.HessianOperator(case.model, case.loader(), he.supervised_loss(case.loss_fn))


def _curv(case: Case):
    from curvlinops import HessianLinearOperator

    params = [q for q in case.model.parameters() if q.requires_grad]
    return HessianLinearOperator(case.model, _loss_module(case), params, case.batches,
                                 check_deterministic=False)


def trace_tools(case: Case, m: int) -> list[H.Tool]:
    import hbkernels as hbk

    op = hbk.HessianOperator(case.model, case.loss_fn, case.data)

    def seeded(fn):
        def call():
            torch.manual_seed(0)
            return float(fn())
        return call

    def pyh():
        hs = _pyhessian(case)
        return seeded(lambda: np.mean(hs.trace(maxIter=m, tol=0.0)))

    def curv(name):
        def make():
            import curvlinops

            A = _curv(case)
            return seeded(lambda: getattr(curvlinops, name)(A, m))
        return make

    def he(method):
        def make():
            import hessian_eigenthings as hem

            op2 = _he_op(case)
            return seeded(lambda: hem.trace(op2, num_matvecs=m, method=method, seed=0).estimate)
        return make

    return [
        H.Tool("hbk.hessian_trace hutch++", lambda: seeded(
            lambda: hbk.hessian_trace(op, num_probes=m, seed=0).estimate), ours=True,
            note=f"{m} HVPs"),
        H.Tool("hbk.hessian_trace hutchinson", lambda: seeded(
            lambda: hbk.hessian_trace(op, num_probes=m, method="hutchinson", seed=0).estimate),
            note=f"{m} HVPs"),
        H.Tool("PyHessian trace", pyh, package="pyhessian", note=f"maxIter {m}, tol 0"),
        H.Tool("curvlinops hutchinson_trace", curv("hutchinson_trace"), package="curvlinops",
               note=f"{m} HVPs"),
        H.Tool("curvlinops hutchpp_trace", curv("hutchpp_trace"), package="curvlinops",
               note=f"{m} HVPs"),
        H.Tool("hessian-eigenthings trace hutchinson", he("hutchinson"),
               package="hessian_eigenthings", note=f"{m} HVPs"),
        H.Tool("hessian-eigenthings trace hutch++", he("hutch++"),
               package="hessian_eigenthings", note=f"{m} HVPs"),
    ]


def _measure_from_density(grid, density) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(torch.as_tensor(grid).double().cpu()).reshape(-1)
    d = np.clip(np.asarray(torch.as_tensor(density).double().cpu()).reshape(-1), 0, None)
    return g, d / max(d.sum(), 1e-300)


def _measure_from_nodes(nodes, weights) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([np.asarray(n, dtype=float).reshape(-1) for n in nodes])
    w = np.concatenate([np.asarray(v, dtype=float).reshape(-1) for v in weights])
    return x, w / w.sum()


def wasserstein1(xa, wa, xb, wb) -> float:
    """W1 distance of two discrete measures on the real line (integral of |F_a - F_b|)."""
    xs = np.sort(np.concatenate([xa, xb]))

    def cdf(x, w, at):
        o = np.argsort(x)
        c = np.concatenate([[0.0], np.cumsum(w[o])])
        return c[np.searchsorted(x[o], at, side="right")]

    at = xs[:-1]
    return float(np.sum(np.abs(cdf(xa, wa, at) - cdf(xb, wb, at)) * np.diff(xs)))


def density_tools(case: Case, probes: int, steps: int) -> list[H.Tool]:
    import hbkernels as hbk

    op = hbk.HessianOperator(case.model, case.loss_fn, case.data)

    def ours():
        def call():
            r = hbk.spectral_density(op, num_probes=probes, lanczos_steps=steps, seed=0)
            return _measure_from_nodes(r.nodes, r.weights)
        return call

    def pyh():
        hs = _pyhessian(case)

        def call():
            torch.manual_seed(0)
            nodes, weights = hs.density(iter=steps, n_v=probes)
            return _measure_from_nodes(nodes, weights)
        return call

    def curv():
        from curvlinops import lanczos_approximate_spectrum

        A = _curv(case)

        def call():
            torch.manual_seed(0)
            g, d = lanczos_approximate_spectrum(A, ncv=steps, num_repeats=probes)
            return _measure_from_density(g, d)
        return call

    def he():
        import hessian_eigenthings as hem

        op2 = _he_op(case)

        def call():
            r = hem.spectral_density(op2, num_runs=probes, lanczos_steps=steps, seed=0)
            return _measure_from_nodes(r.raw_eigenvalues, r.raw_weights)
        return call

    note = f"{probes} probes x {steps} Lanczos steps"
    return [H.Tool("hbk.spectral_density", ours, ours=True, note=note),
            H.Tool("PyHessian density", pyh, package="pyhessian", note=note),
            H.Tool("curvlinops lanczos_approximate_spectrum", curv, package="curvlinops",
                   note=note + " (grid density)"),
            H.Tool("hessian-eigenthings spectral_density", he, package="hessian_eigenthings",
                   note=note)]


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    import hbkernels as hbk

    rows = []
    m = 99 if scale == "full" else 9
    probes, steps = (5, 60) if scale == "full" else (2, 10)
    for name in models:
        kw = {"width": 50} if name == "mlp" and scale == "full" else {}
        case = make_case(name, scale, **kw)
        Hm = hbk.exact_hessian(case.model, case.loss_fn, case.data, dtype=torch.float64)
        tr = float(Hm.diagonal().sum())
        sd = float(np.sqrt(2 * (float(Hm.square().sum()) - float(Hm.diagonal().square().sum()))
                           / m))
        evals = torch.linalg.eigvalsh(Hm).numpy()
        del Hm
        span = float(evals[-1] - evals[0]) or 1.0

        def check_trace(est, tr=tr, sd=sd):
            err = abs(est - tr)
            return err <= 4 * sd, err / abs(tr), f"rel err {err / abs(tr):.1e} ({err / sd:.1f} sd)"

        label = f"{name} (p={case.p}, n={case.n})"
        extra = {"model": name, "p": case.p, "n": case.n, "trace": tr, "hutchinson_sd": sd}
        rows += H.run_tools(trace_tools(case, m), check_trace, repeats, task="trace",
                            case=label, extra=extra)

        w_true = np.full(evals.size, 1.0 / evals.size)

        def check_density(meas, evals=evals, w_true=w_true, span=span):
            x, w = meas
            d = wasserstein1(x, w, evals, w_true) / span
            return d <= W1_AGREE, d, f"W1/range {d:.1e}"

        rows += H.run_tools(density_tools(case, probes, steps), check_density, repeats,
                            task="density", case=label, extra=extra)
        print(f"[trace] {name}: done", flush=True)
    return rows
