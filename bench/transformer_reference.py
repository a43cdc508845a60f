"""Which top Hessian eigenvalues of a transformer are right: hbk's or curvlinops'? (issue 8)

On the bench transformer (d = 64, p = 67,780) hbk's and hessian-eigenthings' top-10 agreed
with each other and differed from curvlinops' by up to 6.4e-4 relative, in float64 too. This
script answers it on a small copy (d = 8, 2 heads, p = 988, n = 128 in 4 batches, float64)
against the exact Hessian (torch.autograd.functional.hessian of the total loss, math
attention), and isolates the cause with a three-line function.

Requires curvlinops-for-pytorch (a bench-only dependency). ``python bench/transformer_reference.py``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import hbkernels as hbk


class TinyTransformer(nn.Module):
    """As bench/models.py: embedding + positions, one encoder layer, mean pool, linear head."""

    def __init__(self, vocab=32, seq=12, d=8, heads=2, ff=16, num_classes=4, dropout=0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=dropout, batch_first=True)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, tokens):
        with sdpa_kernel(SDPBackend.MATH):
            h = self.layer(self.embed(tokens) + self.pos)
        return self.fc(h.mean(1))


def setup(dropout: float, n: int = 128):
    gen = torch.Generator().manual_seed(0)
    X = torch.randint(0, 32, (n, 12), generator=gen)
    y = (X[:, 0] % 4).long()
    torch.manual_seed(0)
    model = TinyTransformer(dropout=dropout).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval(), X, y


def exact(model, X, y) -> torch.Tensor:
    named = dict(model.named_parameters())
    shapes, numels = [p.shape for p in named.values()], [p.numel() for p in named.values()]

    def f(theta):
        d = {k: t.view(s) for k, t, s in zip(named, torch.split(theta, numels), shapes)}
        return F.cross_entropy(functional_call(model, d, (X,)), y)

    return torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in named.values()]),
                                             vectorize=True)


def top(H: torch.Tensor, k: int = 10) -> torch.Tensor:
    return torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)[:k]


def main() -> None:
    torch.set_num_threads(1)
    from curvlinops import HessianLinearOperator

    for dropout in (0.0, 0.1):  # 0.1: the layer's default, inactive in eval mode
        model, X, y = setup(dropout)
        batches = [(X[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
        H = exact(model, X, y)
        ref = top(H)
        E = torch.eye(H.shape[0], dtype=torch.float64)
        rows = {}
        for name, M in (
            ("hbk double_backward", hbk.exact_hessian(model, "ce", batches, method="double_backward")),
            ("hbk forward_over_reverse", hbk.exact_hessian(model, "ce", batches, method="forward_over_reverse")),
            ("curvlinops, 4 batches", HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()),
                                                            batches, check_deterministic=False) @ E),
            ("curvlinops, 1 batch", HessianLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()),
                                                          [(X, y)], check_deterministic=False) @ E),
        ):
            rows[name] = (float(((top(M) - ref).abs() / ref.abs()).max()),
                          float((M - H).abs().max() / H.abs().max()))
        print(f"dropout={dropout} (eval), p={H.shape[0]}, lambda_1={float(ref[0]):.6g}")
        for name, (e_top, e_h) in rows.items():
            print(f"  {name:26s} top-10 max rel. error {e_top:.2e}, max |H - H_exact| / max |H| {e_h:.2e}")

    # The cause: jvp over jacrev (curvlinops' HVP) is wrong for a layer norm with a weight whose
    # input depends on the parameters, in torch 2.13; jvp over grad (hbk) is right.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    p0 = {"w": torch.randn(8, 8, dtype=torch.float64), "g": torch.randn(8, dtype=torch.float64)}
    t = {k: torch.randn_like(v) for k, v in p0.items()}

    def f(p):
        return F.layer_norm(x @ p["w"], (8,), p["g"]).sin().sum()

    a, b = jvp(grad(f), (p0,), (t,))[1], jvp(jacrev(f), (p0,), (t,))[1]
    print(f"f = sum(sin(layer_norm(x @ W, weight=g))), torch {torch.__version__}: "
          f"|jvp(grad) - jvp(jacrev)| = {max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")


if __name__ == "__main__":
    main()
