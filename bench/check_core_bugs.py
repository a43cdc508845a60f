"""Before/after numbers for the core's silent-wrong cases (issue 8, bugs a-g).

Run with the current package (``python bench/check_core_bugs.py``) or with an older tree
copied as a package named ``hbk_old`` (``PYTHONPATH=/tmp/old python bench/check_core_bugs.py
--old``; see bench/hvp_speed.py for how to make that copy). Prints one line per case.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


def ref_hessian(model, loss_fn, X, y):
    named = dict(model.named_parameters())
    shapes, numels = [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(named, torch.split(theta, numels), shapes)}
        return loss_fn(functional_call(model, d, (X,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in named.values()]),
                                                 vectorize=True)


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {str(e)[:110]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", action="store_true")
    hbk = importlib.import_module("hbk_old" if ap.parse_args().old else "hbkernels")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=g)
    Y = torch.randn(23, 4, generator=g, dtype=torch.float64)
    batches = lambda t: [(X[:4], t[:4]), (X[4:15], t[4:15]), (X[15:], t[15:])]

    # (a) reduction="sum" over several batches
    for name, loss_fn, t in (("MSELoss(sum)", nn.MSELoss(reduction="sum"), Y),
                             ("CrossEntropyLoss(sum)", nn.CrossEntropyLoss(reduction="sum"), y)):
        H = ref_hessian(model, loss_fn, X, t)
        for method in ("double_backward", "forward_over_reverse", "linear_chain"):
            def rel(method=method, loss_fn=loss_fn, t=t, H=H):
                Hx = hbk.exact_hessian(model, loss_fn, batches(t), method=method)
                return f"relative error {float((Hx - H).norm() / H.norm()):.3g}"
            print(f"(a) {name}, 3 batches, {method}: {attempt(rel)}")

    # (b) active dropout: two identical calls
    drop = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).double()

    def twice():
        H1 = hbk.exact_hessian(drop, F.cross_entropy, (X, y))
        H2 = hbk.exact_hessian(drop, F.cross_entropy, (X, y))
        return f"two calls differ by {float((H1 - H2).norm() / H1.norm()):.3g} (relative)"
    print(f"(b) exact_hessian, Dropout(0.5) in train mode: {attempt(twice)}")

    # (c) shuffled, drop_last loader: two operators from the same loader
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True, drop_last=True)

    def two_ops():
        v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        a = hbk.HessianOperator(model, F.cross_entropy, loader) @ v
        b = hbk.HessianOperator(model, F.cross_entropy, loader) @ v
        return f"two operators differ by {float((a - b).norm() / a.norm()):.3g} (relative)"
    print(f"(c) shuffle=True, drop_last=True loader: {attempt(two_ops)}")

    # (d) forward-over-reverse with MSE
    def mse_for():
        op = hbk.HessianOperator(model, F.mse_loss, (X, Y), method="forward_over_reverse")
        H = ref_hessian(model, F.mse_loss, X, Y)
        E = torch.eye(op.dim, dtype=torch.float64)
        return f"relative error {float(((op @ E) - H).norm() / H.norm()):.3g}"
    print(f"(d) forward_over_reverse, F.mse_loss: {attempt(mse_for)}")

    # (e) TransformerEncoderLayer classifier in eval mode
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, t):
            return self.fc(self.layer(self.emb(t)).mean(1))

    torch.manual_seed(0)
    tf = Classifier().double().eval()
    tok = torch.randint(0, 5, (6, 3), generator=g)
    ty = torch.tensor([0, 1, 1, 0, 1, 0])
    Ht = ref_hessian(tf, F.cross_entropy, tok, ty)
    for method in ("double_backward", "forward_over_reverse"):
        def tf_run(method=method):
            op = hbk.HessianOperator(tf, F.cross_entropy, (tok, ty), method=method)
            V = torch.randn(op.dim, 4, dtype=torch.float64)
            return f"relative error {float(((op @ V) - Ht @ V).norm() / (Ht @ V).norm()):.3g}"
        print(f"(e) TransformerEncoderLayer d=8, {method}: {attempt(tf_run)}")

    # (g) estimators and shard
    A = torch.diag(torch.tensor([0.5, 1.2, 1.75], dtype=torch.float64))

    class Bad:
        dim, dtype = 3, torch.float64

        def matvec(self, V):
            return (A @ V)[:, :1]

    def trace():
        return f"estimate {hbk.hessian_trace(Bad(), num_probes=30, seed=0).estimate:.3g}"
    print(f"(g) hessian_trace of a (dim, 1)-output operator, trace {float(A.trace()):.3g}: {attempt(trace)}")

    def density():
        d = hbk.spectral_density(3 * torch.eye(12, dtype=torch.float64), num_probes=4, lanczos_steps=6, seed=0)
        dx = float(d.grid[1] - d.grid[0])
        return f"integral {float(d.density.sum() * dx):.3g}, sigma {d.sigma:.3g}"
    print(f"(g) spectral_density(3 * I): {attempt(density)}")
    shard = importlib.import_module(hbk.__name__ + ".distributed").shard
    print("(g) shard(12 rows of X, 4 labels) to 2 ranks: "
          f"{attempt(lambda: str([tuple(t.shape[0] for t in shard((torch.randn(12, 2), torch.arange(4)), r, 2)) for r in (0, 1)]))}")


if __name__ == "__main__":
    main()
