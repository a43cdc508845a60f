"""Top-k Hessian eigenpairs: hbk.hessian_eigs against every anchor, at matched accuracy.

Matching: every solver gets tolerance ``TOL`` (1e-6) in its own convergence measure (hbk and
ARPACK: residual; PyHessian and hessian-eigenthings power iteration: relative change of the
eigenvalue, their iteration caps at the libraries' defaults; torch.lobpcg: residual).
hessian-eigenthings' ``lanczos`` has no restart and no tolerance-driven stop, so it gets the
same HVP budget as hbk used (``max_iter`` = hbk's HVP count, full reorthogonalisation).
Ground truth: ARPACK at tol 1e-10 on a float64 plain-autograd HVP (independent of hbk).
A row agrees when every one of its top-k eigenvalues is within ``AGREE`` (1e-3) of the truth,
relative to ``max(|lambda_i|, 1e-2 |lambda_1|)``.
"""

from __future__ import annotations

import time

import _harness as H
import numpy as np
import torch
from models import Case, device, flat_loss_fn, make_case
from torch import nn

TOL = 1e-6
AGREE = 1e-3
EXACT_MAX_P = 5_000  # torch.lobpcg needs the dense matrix (its assembly is timed)


def plain_hvp(case: Case, dtype: torch.dtype):
    """What a user writes without hbk: full forward, grad with create_graph, grad again."""
    f, theta0 = flat_loss_fn(case, dtype)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        theta = theta0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
        (hv,) = torch.autograd.grad(g, theta, v)
        return hv.detach()

    return hvp, theta0.numel()


class Counted:
    """A numpy matvec counting its products."""

    def __init__(self, fn, dtype, device: str = "cpu") -> None:
        self.fn, self.dtype, self.count, self.device = fn, dtype, 0, device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype).reshape(-1))
        return self.fn(v.to(self.device)).cpu().numpy().astype(x.dtype, copy=False)


def eigsh_top(matvec, p: int, k: int, tol: float, dtype=np.float32) -> tuple[np.ndarray, int]:
    import scipy.sparse.linalg as sla

    mv = Counted(matvec, dtype, device())
    op = sla.LinearOperator((p, p), matvec=mv, dtype=dtype)
    v0 = np.random.RandomState(0).randn(p).astype(dtype)
    w = sla.eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(w)[::-1], mv.count


def ground_truth(case: Case, k: int) -> np.ndarray:
    hvp, p = plain_hvp(case, torch.float64)
    if p <= 600:  # tiny (smoke) problems: the dense matrix
        f, theta0 = flat_loss_fn(case, torch.float64)
        Hm = torch.autograd.functional.hessian(f, theta0)
        return torch.linalg.eigvalsh(Hm).flip(0)[:k].cpu().numpy()
    w, _ = eigsh_top(hvp, p, k, 1e-10, np.float64)
    return w


def checker(truth: np.ndarray):
    scale = np.maximum(np.abs(truth), 1e-2 * abs(truth[0]))

    def check(vals) -> tuple[bool, float, str]:
        if isinstance(vals, torch.Tensor):
            vals = vals.detach().double().cpu().numpy()
        v = np.sort(np.asarray(vals, dtype=np.float64).reshape(-1))[::-1]
        if v.size < truth.size or not np.all(np.isfinite(v[:truth.size])):
            return False, float("inf"), f"got {v.size} finite values of {truth.size}"
        err = float(np.max(np.abs(v[:truth.size] - truth) / scale))
        return err <= AGREE, err, f"max rel eig err {err:.1e}"

    return check


def _loss_module(case: Case) -> nn.Module:
    return nn.MSELoss() if case.loss_fn is torch.nn.functional.mse_loss else nn.CrossEntropyLoss()


def tools(case: Case, k: int, budget: dict) -> list[H.Tool]:
    import hbkernels as hbk

    model, p = case.model, case.p
    out: list[H.Tool] = []

    def hbk_eigs():
        def call():
            r = hbk.hessian_eigs(model, case.loss_fn, case.data, k=k, tol=TOL, seed=0)
            budget["hbk_hvps"] = max(budget.get("hbk_hvps", 0), int(r.num_matvecs))
            return r.eigenvalues
        return call

    out.append(H.Tool("hbk.hessian_eigs", hbk_eigs, ours=True, note=f"tol {TOL:g}"))

    def eigsh_plain():
        hvp, _ = plain_hvp(case, torch.float32)
        return lambda: eigsh_top(hvp, p, k, TOL)[0]

    out.append(H.Tool("scipy eigsh + plain HVP", eigsh_plain, reference=True,
                      note=f"ARPACK tol {TOL:g}, double backward per product"))

    def eigsh_hbk():
        op = hbk.HessianOperator(model, case.loss_fn, case.data)
        return lambda: eigsh_top(op.matvec, p, k, TOL)[0]

    out.append(H.Tool("scipy eigsh + hbk.HessianOperator", eigsh_hbk, reference=True,
                      note=f"ARPACK tol {TOL:g}, our HVP"))

    def pyhessian():
        from pyhessian import hessian

        crit = _loss_module(case)
        if len(case.batches) == 1:
            hs = hessian(model, crit, data=(case.X, case.y), cuda=device() != "cpu")
        else:
            hs = hessian(model, crit, dataloader=case.loader(), cuda=device() != "cpu")

        def call():
            torch.manual_seed(0)
            vals, _ = hs.eigenvalues(maxIter=100, tol=TOL, top_n=k)
            return torch.tensor(vals)
        return call

    out.append(H.Tool("PyHessian eigenvalues", pyhessian, package="pyhessian",
                      note=f"power iteration, maxIter 100 (default), tol {TOL:g}"))

    def he_op():
        import hessian_eigenthings as he

        return he.HessianOperator(model, case.loader(), he.supervised_loss(case.loss_fn))

    def he_lanczos():
        import hessian_eigenthings as he

        op = he_op()
        m = min(p - 1, max(2 * k, budget.get("hbk_hvps", 2 * k)))
        return lambda: he.lanczos(op, k=k, max_iter=m, tol=TOL, which="LA", seed=0,
                                  reorthogonalize=True).eigenvalues

    out.append(H.Tool("hessian-eigenthings lanczos", he_lanczos, package="hessian_eigenthings",
                      note="max_iter = hbk's HVP count, full reorth."))

    def he_power():
        import hessian_eigenthings as he

        op = he_op()
        return lambda: he.deflated_power_iteration(op, k=k, max_iter=100, tol=TOL,
                                                   seed=0).eigenvalues

    out.append(H.Tool("hessian-eigenthings deflated_power_iteration", he_power,
                      package="hessian_eigenthings", note=f"max_iter 100, tol {TOL:g}"))

    def curvlinops():
        from curvlinops import HessianLinearOperator

        params = [q for q in model.parameters() if q.requires_grad]
        A = HessianLinearOperator(model, _loss_module(case), params, case.batches,
                                  check_deterministic=False).to_scipy(np.float32)
        # (curvlinops' scipy wrapper moves vectors to the operator's device itself)
        import scipy.sparse.linalg as sla

        v0 = np.random.RandomState(0).randn(p).astype(np.float32)
        return lambda: np.sort(sla.eigsh(A, k=k, which="LA", tol=TOL, v0=v0,
                                         return_eigenvectors=False))[::-1]

    out.append(H.Tool("curvlinops HessianLinearOperator + eigsh", curvlinops,
                      package="curvlinops", note=f"ARPACK tol {TOL:g}"))

    if p <= EXACT_MAX_P and case.name != "transformer":  # its dense assembly takes minutes
        def lobpcg():
            X0 = torch.randn(p, k, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64).to(case.X.device)

            def call():
                import warnings

                Hm = hbk.exact_hessian(model, case.loss_fn, case.data, dtype=torch.float64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    w, _ = torch.lobpcg(Hm, k=k, X=X0, largest=True, tol=TOL, niter=300)
                return w
            return call

        out.append(H.Tool("torch.lobpcg on the exact matrix", lobpcg, reference=False,
                          note="tol 1e-6 on the float64 matrix; time includes its assembly "
                               "(hbk.exact_hessian)"))
    return out


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        case = make_case(name, scale)
        k = (10 if name == "mlp" else 5) if scale == "full" else 2
        t0 = time.perf_counter()
        truth = ground_truth(case, k)
        t_truth = time.perf_counter() - t0
        print(f"    {name}: ground truth in {t_truth:.1f} s", flush=True)
        budget: dict = {}
        rows += H.run_tools(tools(case, k, budget), checker(truth), repeats, task="eigen",
                            device=device(),
                            case=f"{name} (p={case.p}, n={case.n}, k={k})",
                            extra={"model": name, "p": case.p, "n": case.n, "k": k,
                                   "truth_s": t_truth, "lambda_1": float(truth[0])})
        print(f"[eigen] {name}: done", flush=True)
    return rows
