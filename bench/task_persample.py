"""Per-sample gradient alignment, norms and Gram (label = the model's prediction).

Tools: hbk.gradient_alignment / gradient_norms / gradient_gram (never forming G where the
layers allow it); the paper's loop (one forward/backward per sample, flatten, ``np.dot`` with
a Python list of vectors, as the reference code; timed on a subset and extrapolated);
torch.func ``vmap(grad)`` then one GEMM; BackPACK ``BatchGrad`` then the GEMM; Opacus
``GradSampleModule`` then the GEMM. Ground truth: ``vmap(grad)`` in float64.
Agreement: alignment max |dC| <= 1e-3; norms and Gram max relative error <= 1e-3.
"""

from __future__ import annotations

import copy

import _harness as H
import numpy as np
import torch
import torch.nn.functional as F
from models import Case, device, make_case

AGREE = 1e-3


def vmap_grads(model, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(th, x, t):
        return F.cross_entropy(functional_call(model, (th, buffers), (x[None],)), t[None])

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], 1)


def cosine(G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return (G @ V) / (G.norm(dim=1, keepdim=True) * V.norm(dim=0, keepdim=True))


def finish(op: str, G: torch.Tensor, V: torch.Tensor | None) -> torch.Tensor:
    if op == "align":
        return cosine(G, V)
    if op == "norms":
        return G.norm(dim=1)
    return G @ G.T


def paper_loop(model, X: torch.Tensor, vec_list: list) -> np.ndarray:
    """The reference code's pattern (paraphrased): one sample at a time, list of vectors."""
    params = list(model.parameters())
    out = np.zeros((len(vec_list), X.shape[0]))
    for i in range(X.shape[0]):
        o = model(X[i:i + 1])
        y = o.detach().argmax(1)
        loss = F.cross_entropy(o, y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).cpu().numpy()
        ov = np.dot(vec_list, g)  # the list becomes a (k, p) array here ...
        if np.linalg.norm(g) != 0:
            ov = np.dot(vec_list, g) / np.linalg.norm(g)  # ... and here again
        out[:, i] = ov
    return out


def backpack_grads(model, X: torch.Tensor):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    m = extend(copy.deepcopy(model))
    lossf = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def call():
        out = m(X)
        with backpack(BatchGrad()):
            lossf(out, out.detach().argmax(1)).backward()
        missing = [n for n, q in m.named_parameters() if not hasattr(q, "grad_batch")]
        if missing:
            raise NotImplementedError(f"BackPACK BatchGrad gave no grad_batch for {missing[:3]} "
                                      "(layer not supported)")
        G = torch.cat([q.grad_batch.reshape(X.shape[0], -1) for q in m.parameters()], 1)
        for q in m.parameters():
            q.grad = None
            del q.grad_batch
        return G

    return call


def opacus_grads(model, X: torch.Tensor):
    from opacus import GradSampleModule

    # Opacus records activations only in training mode (same outputs here: no dropout, and
    # it rejects BatchNorm anyway).
    m = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")

    def call():
        out = m(X)
        F.cross_entropy(out, out.detach().argmax(1), reduction="sum").backward()
        G = torch.cat([q.grad_sample.reshape(X.shape[0], -1) for q in m.parameters()], 1)
        for q in m.parameters():
            q.grad = None
            q.grad_sample = None
        return G

    return call


def tools(case: Case, op: str, V: torch.Tensor | None, sub: int) -> list[H.Tool]:
    import hbkernels as hbk

    model, X = case.model, case.X
    with torch.no_grad():
        y = model(X).argmax(1)

    def hbk_call():
        if op == "align":
            return lambda: hbk.gradient_alignment(model, X, V)
        if op == "norms":
            return lambda: hbk.gradient_norms(model, X)
        return lambda: hbk.gradient_gram(model, X)

    out = [H.Tool(f"hbk.gradient_{'alignment' if op == 'align' else op}", hbk_call, ours=True)]
    if op == "align":
        def paper():
            Vnp = V.cpu().numpy()
            vec_list = [Vnp[:, j] for j in range(V.shape[1])]
            return lambda: torch.from_numpy(paper_loop(model, X[:sub], vec_list).T).to(X.device)

        out.append(H.Tool("paper loop (per sample, list of vectors)", paper,
                          scale=case.n / sub, note=f"timed on {sub} samples, x n/{sub}",
                          meta={"subset": sub}))
    def then_finish(grads_factory):
        def make():
            grads = grads_factory()
            return lambda: finish(op, grads(), V)
        return make

    out.append(H.Tool("torch.func vmap(grad) + GEMM", then_finish(
        lambda: lambda: vmap_grads(model, X, y)), reference=True))
    out.append(H.Tool("BackPACK BatchGrad + GEMM", then_finish(
        lambda: backpack_grads(model, X)), package="backpack"))
    out.append(H.Tool("Opacus GradSampleModule + GEMM", then_finish(
        lambda: opacus_grads(model, X)), package="opacus",
        note="module in train mode (Opacus hooks need it)"))
    return out


def run(scale: str, repeats: int, models: list[str]) -> list[dict]:
    rows = []
    k = 25 if scale == "full" else 4
    for name in models:
        specs = [(name, None, k, ("align", "norms", "gram"))]
        if name == "mlp":  # the paper's G workload: 150 training points x all p eigenvectors
            specs.append((name, 150 if scale == "full" else None, -1, ("align",)))
        for _, n, kk, ops in specs:
            rows += _case_rows(make_case(name, scale, n=n), kk, ops, scale, repeats)
        print(f"[persample] {name}: done", flush=True)
    return rows


def _case_rows(case: Case, k: int, ops: tuple[str, ...], scale: str, repeats: int) -> list[dict]:
    """Rows of one model and data set; ``k = -1``: all p vectors."""
    if case.persample_loss is None:
        return []
    k = case.p if k < 0 else k
    model64 = copy.deepcopy(case.model).double()
    X64 = case.X.double() if case.X.is_floating_point() else case.X
    with torch.no_grad():
        y = case.model(case.X).argmax(1)
    G64 = vmap_grads(model64, X64, y)
    V = torch.randn(case.p, k, generator=torch.Generator().manual_seed(2)).to(case.X.device)
    V /= V.norm(dim=0, keepdim=True)
    sub = min(case.n, (50 if k < 1000 else 2) if scale == "full" else 4)
    rows = []
    for op in ops:
        truth = finish(op, G64, V.double())

        def check(ans, truth=truth, op=op):
            ans = torch.as_tensor(ans).double()
            t = truth[:ans.shape[0]]  # a subset run (the paper loop) covers the first rows
            if op == "align":
                err = float((ans - t).abs().max())
                return err <= AGREE, err, f"max abs cos err {err:.1e}"
            err = float((ans - t).abs().max() / t.abs().max())
            return err <= AGREE, err, f"max rel err {err:.1e}"

        kk = "all p" if k == case.p else str(k)
        rows += H.run_tools(tools(case, op, V, sub), check, repeats, task="persample",
                            device=device(),
                            case=f"{case.name} {op}{f' k={kk}' if op == 'align' else ''} "
                                 f"(p={case.p}, n={case.n})",
                            extra={"model": case.name, "op": op, "p": case.p, "n": case.n,
                                   "k": k})
    return rows
