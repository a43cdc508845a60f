"""CUDA paths: every op, the Lanczos driver (basis on the device) and the per-sample engine.

Marked ``cuda``; skipped with the reason "no CUDA device" where none exists. Each test runs
the op on the device and compares it with the plain-torch reference (hbkernels.reference,
torch.func) on the same device and with the CPU result. ``HBK_TEST_CUDA_ON_CPU=1`` runs the
same tests on the CPU to check their logic on a machine without a GPU (what this repository's
CI can do); ``bench/gpu_check.sh`` runs them on a GPU.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbkernels as hbk
from hbkernels import reference as ref

ON_CPU = os.environ.get("HBK_TEST_CUDA_ON_CPU") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def dev():
    """The device under test; on the CPU logic check, one thread (tiny problems stall in
    OpenMP barriers on a loaded machine)."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.device("cpu")
    torch.set_num_threads(before)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=rtol * max(scale, 1e-30))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gram_and_cosine_alignment(dev, dtype):
    G = torch.randn(70, 300, generator=_gen(), dtype=dtype)
    V = torch.randn(300, 9, generator=_gen(1), dtype=dtype)
    Gd, Vd = G.to(dev), V.to(dev)
    K = hbk.gram(Gd)
    C = hbk.cosine_alignment(Gd, Vd)
    assert K.device.type == dev.type and C.device.type == dev.type
    _close(K, ref.gram(Gd))
    _close(C, ref.cosine_alignment(Gd, Vd))
    _close(K, hbk.gram(G))  # the device result equals the CPU one
    _close(C, hbk.cosine_alignment(G, V))


def _factors(dev, n=40, T=None, dims=((6, 5), (5, 3)), k=4):
    g = _gen(3)
    shape = (n,) if T is None else (n, T)
    A = [torch.randn(*shape, di, generator=g).to(dev) for di, _ in dims]
    D = [torch.randn(*shape, do, generator=g).to(dev) for _, do in dims]
    W = [torch.randn(do, di, k, generator=g).to(dev) for di, do in dims]
    B = [torch.randn(do, k, generator=g).to(dev) for _, do in dims]
    return A, D, W, B


@pytest.mark.parametrize("T", [None, 3], ids=["vector", "sequence"])
def test_ghost_ops(dev, T):
    A, D, W, B = _factors(dev, T=T)
    flags = [True, True]
    for got, want in (
            (hbk.ghost_gram(A, D, flags), ref.ghost_gram(A, D, flags)),
            (hbk.ghost_sq_norms(A, D, flags), ref.ghost_sq_norms(A, D, flags)),
            (hbk.ghost_dots(A, D, W, B), ref.ghost_dots(A, D, W, B)),
            (hbk.ghost_alignment(A, D, W, B), ref.ghost_alignment(A, D, W, B))):
        assert got.device.type == dev.type
        _close(got, want)
    dots = hbk.ghost_dots(A, D, W, B)
    sq = hbk.ghost_sq_norms(A, D, flags)
    vsq = sum(w.square().sum((0, 1)) + b.square().sum(0) for w, b in zip(W, B))
    _close(hbk.cosine_from_dots(dots, sq, vsq), ref.cosine_from_dots(dots, sq, vsq))


def test_opcheck_on_device(dev):
    """torch.library.opcheck (schema, fake tensor, autograd registration) on device inputs."""
    G = torch.randn(12, 20, generator=_gen()).to(dev)
    V = torch.randn(20, 3, generator=_gen(1)).to(dev)
    torch.library.opcheck(torch.ops.hbkernels.gram.default, (G,))
    torch.library.opcheck(torch.ops.hbkernels.cosine_alignment.default, (G, V))


# ----------------------------------------------------------------------------- Lanczos
def test_lanczos_keeps_the_basis_on_the_device(dev):
    p, k = 400, 5
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=_gen(), dtype=torch.float64))
    lam = torch.cat([torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0], dtype=torch.float64),
                     torch.linspace(-1, 1, p - 5, dtype=torch.float64)])
    A = ((Q * lam) @ Q.T).to(dev)
    seen = []

    def matvec(v):
        seen.append(v.device.type)
        return A @ v

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            r = hbk.lanczos(matvec, p, k, tol=1e-10, seed=0, device=dev)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(x.message) for x in w)
    assert set(seen) == {dev.type}
    assert r.eigenvectors.device.type == dev.type
    _close(r.eigenvalues, lam[:k], rtol=1e-8)
    res = (A @ r.eigenvectors - r.eigenvectors * r.eigenvalues.to(dev)).norm(dim=0)
    assert float(res.max()) < 1e-7
    # The projected problem (alpha, beta per step) lives on the host; nothing else may sync
    # per step: allow a few host transfers per product.
    assert syncs <= 4 * r.num_matvecs + 50, (syncs, r.num_matvecs)


def _mlp(dev, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).to(dev, dtype)


def _cnn(dev):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).to(dev)


def _flat_hessian(model, X, y):
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    sizes = [q.numel() for _, q in model.named_parameters()]
    theta0 = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return F.cross_entropy(functional_call(model, d, (X,)), y)

    return torch.autograd.functional.hessian(f, theta0)


def test_hessian_operator_eigs_exact_trace_density(dev):
    model = _mlp(dev, torch.float64)
    g = _gen(5)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64).to(dev)
    y = torch.randint(0, 4, (64,), generator=g).to(dev)
    Ht = _flat_hessian(model, X, y)
    evals = torch.linalg.eigvalsh(Ht).flip(0)
    H = hbk.exact_hessian(model, F.cross_entropy, (X, y))
    assert H.device.type == dev.type
    _close(H, Ht, rtol=1e-10)
    op = hbk.HessianOperator(model, F.cross_entropy, (X, y))
    v = torch.randn(op.dim, generator=g, dtype=torch.float64).to(dev)
    _close(op.matvec(v), Ht @ v, rtol=1e-10)
    r = hbk.hessian_eigs(model, F.cross_entropy, (X, y), k=3, tol=1e-8, seed=0)
    assert r.eigenvectors.device.type == dev.type
    _close(r.eigenvalues, evals[:3], rtol=1e-6)
    tr = hbk.hessian_trace(op, num_probes=99, seed=0)
    assert abs(tr.estimate - float(Ht.trace())) <= 5 * tr.std_error + 1e-10
    sd = hbk.spectral_density(op, num_probes=2, lanczos_steps=20, seed=0)
    assert abs(float(sd.weights.sum()) - 2.0) < 1e-8


# ----------------------------------------------------------------------------- per-sample
def _vmap_grads(model, X, y):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(th, x, t):
        return F.cross_entropy(functional_call(model, th, (x[None],)), t[None])

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], 1)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_per_sample_engine(dev, arch):
    model = _mlp(dev) if arch == "mlp" else _cnn(dev)
    g = _gen(7)
    X = (torch.randn(50, 3, generator=g) if arch == "mlp"
         else torch.randn(50, 1, 8, 8, generator=g)).to(dev)
    with torch.no_grad():
        y = model(X).argmax(1)
    G = _vmap_grads(model, X, y)
    V = torch.randn(G.shape[1], 6, generator=g).to(dev)
    out = {
        "grads": (hbk.per_sample_grads(model, X), G),
        "norms": (hbk.gradient_norms(model, X), G.norm(dim=1)),
        "gram": (hbk.gradient_gram(model, X), G @ G.T),
        "align": (hbk.gradient_alignment(model, X, V), ref.cosine_alignment(G, V)),
    }
    for name, (got, want) in out.items():
        assert got.device.type == dev.type, name
        _close(got, want, rtol=1e-4)
    ev = hbk.gradient_covariance_eigs(model, X, k=3)
    vals = getattr(ev, "eigenvalues", ev[0] if isinstance(ev, tuple) else None)
    if vals is not None:
        want = torch.linalg.eigvalsh((G @ G.T).double() / X.shape[0]).flip(0)[:3]
        _close(torch.as_tensor(vals).double(), want, rtol=1e-3)
