"""The public paper API on any nn.Module and plain tensors: analyze, the round-off rule of eps
and G, the memory rule of the exact spectrum, save/load, alignment_map, file loaders, and
torch.distributed sharding (two gloo ranks against one process).

Ground truth: torch.autograd.functional.hessian + torch.linalg.eigh, torch.func per-sample
gradients.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from curvature_refs import ce_hessian as ref_hessian  # the shared autograd ground truth

import hbkernels.boundary as B
from hbkernels.boundary import measures as M

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _cnn_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = TinyCNN().to(dtype)
    X = torch.randn(15, 1, 5, 5, dtype=dtype)
    y = torch.arange(15) % 3
    return model, X, y


def ref_grads(model, X):
    """Per-sample gradients at the predicted labels, ``(n, p)`` (torch.func)."""
    prm = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        lab = model(X).argmax(-1)

    def one(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(prm, X, lab)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in prm], 1)


# ----------------------------------------------------------------------------- round-off rule
def test_roundoff_mask_rule_is_stated():
    norms = torch.tensor([1.0, 2e-5, 1.1e-5, 1e-9, 0.0], dtype=torch.float64)
    tol = 100 * torch.finfo(torch.float32).eps  # float32 floor even in float64
    assert M.roundoff_tolerance(norms) == pytest.approx(tol)
    assert M.roundoff_mask(norms).tolist() == [True, True, False, False, False]
    # a half-precision analysis uses its own (larger) eps
    half = M.roundoff_tolerance(norms, torch.float16)
    assert half == pytest.approx(100 * torch.finfo(torch.float16).eps)
    assert M.roundoff_mask(norms, factor=0).tolist() == [True, True, True, True, False]
    with pytest.raises(TypeError, match="hbk.boundary.roundoff_tolerance: expected a"):
        M.roundoff_mask(torch.ones(2, 2))


def _saturated_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        m[2].weight.mul_(60.0)  # logit gaps up to ~100: gradients from O(1) down to 1e-20
    X = torch.randn(60, 2) * 2
    y = (X[:, 0] > 0).long()
    return m, X, y


def test_eps_and_G_agree_between_float32_and_float64_copies():
    """The issue: eps 0.0545 vs 0.0569 between copies, decided by round-off gradients."""
    m32, X, y = _saturated_mlp()
    m64 = copy.deepcopy(m32).double()
    # without the rule the copies disagree (the test can fail) ...
    raw32 = M.random_direction_threshold(m32, X, roundoff_factor=None).eps
    raw64 = M.random_direction_threshold(m64, X.double(), roundoff_factor=None).eps
    assert abs(raw32 - raw64) > 0.05 * raw64
    # ... with it they agree
    e32 = M.random_direction_threshold(m32, X)
    e64 = M.random_direction_threshold(m64, X.double())
    assert e32.eps == pytest.approx(e64.eps, rel=1e-3)
    assert e32.num_ignored == e64.num_ignored > 0
    # the same through analyze, G on one exact spectrum (both rules)
    spec = B.compute_spectrum(m64, (X, y))  # all p eigenvectors
    a64 = B.analyze(m64, "ce", (X, y), spectrum=spec)
    a32 = B.analyze(m32, "ce", (X, y), dtype=torch.float32, spectrum=spec)
    assert not a64.G_lower_bound and not a32.G_lower_bound
    assert a32.eps.eps == pytest.approx(a64.eps.eps, rel=1e-3)
    assert a32.num_roundoff == a64.num_roundoff == e64.num_ignored
    assert a32.G_max.count == a64.G_max.count and a32.G_mean.count == a64.G_mean.count
    # the rule by hand: max over the kept points of |cos(g, r)| against torch.func gradients
    G = ref_grads(m64, X.double())
    keep = G.norm(dim=1) > 100 * torch.finfo(torch.float32).eps * G.norm(dim=1).max()
    r = M.random_directions(G.shape[1], 5, 42)
    cos = (G[keep] @ r) / G[keep].norm(dim=1, keepdim=True)
    assert a64.eps.eps == pytest.approx(float(cos.abs().amax(0).mean()), rel=1e-8)


# ----------------------------------------------------------------------------- analyze
def test_analyze_any_module_against_ground_truth_and_save_load(tmp_path):
    model, X, y = _cnn_problem()
    an = B.analyze(model, "ce", (X, y), per_class=True, num_classes=3,
                   names={"model": "TinyCNN", "data": "toy"})
    ev = torch.linalg.eigvalsh(ref_hessian(model, X, y)).flip(0)
    torch.testing.assert_close(an.spectrum.eigenvalues, ev, rtol=1e-8, atol=1e-10)
    assert an.exact and not an.G_lower_bound and an.G_label == "exact"
    assert an.trace == pytest.approx(float(ev.sum()), rel=1e-8)
    assert an.lambda_max == pytest.approx(float(ev[0]), rel=1e-8)
    assert an.spectral_type.type == B.spectral_type(ev).type
    assert an.bulk_outliers.num_outliers == B.count_outliers(ev).count
    assert an.bulk_outliers.num_classes == 3 and set(an.per_class) == {"0", "1", "2"}
    # alignments against torch.func per-sample gradients
    G = ref_grads(model, X)
    V = an.spectrum.eigenvectors[:, :an.alignments.shape[1]]
    ref = (G @ V) / G.norm(dim=1, keepdim=True)
    torch.testing.assert_close(an.alignments, ref, rtol=1e-7, atol=1e-9)
    assert "TinyCNN" in an.report() and "spectral type" in an.report()
    # save / load: tensors beside the JSON, no eigenvector lists in it
    path = an.save(tmp_path / "an.json")
    text = path.read_text()
    assert (tmp_path / "an.pt").exists() and '"__tensor__"' in text
    def longest(o):
        if isinstance(o, dict):
            return max([longest(v) for v in o.values()] + [0])
        if isinstance(o, list):
            return max([len(o)] + [longest(v) for v in o])
        return 0

    assert longest(json.loads(text)) <= 30  # no eigenvector / alignment lists in the JSON
    back = B.Analysis.load(path)
    assert back.G == an.G and back.G_label == "exact" and back.eps.eps == an.eps.eps
    assert torch.equal(back.spectrum.eigenvectors, an.spectrum.eigenvectors)
    assert torch.equal(back.alignments, an.alignments)
    assert back.spectral_type.type == an.spectral_type.type
    assert back.per_class["1"].lambda_max == an.per_class["1"].lambda_max
    assert back.report() == an.report()


def test_analyze_loss_callable_and_legacy_call_agree():
    model, X, y = _cnn_problem()
    a = B.analyze(model, "ce", (X, y))
    spec = B.compute_spectrum(model, (X, y))
    b = B.analyze(model, F.cross_entropy, (X, y), spectrum=spec)
    c = B.analyze(model, (X, y), spectrum=spec)  # analyze(model, data): loss "ce"
    assert a.G == b.G == c.G and a.eps.eps == pytest.approx(b.eps.eps, rel=1e-12)
    with pytest.raises(TypeError, match="hbk.boundary.analyze: expected train_data"):
        B.analyze(model, "ce")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        B.analyze(lambda x: x, "ce", (X, y))


def test_memory_budget_decides_exact_or_lower_bound():
    model, X, y = _cnn_problem()
    p = sum(v.numel() for v in model.parameters())
    need = M.exact_spectrum_bytes(p)
    assert need == (4 * p * p + 6 * p) * 8
    assert M.exact_spectrum_fits(p, memory_budget=need)
    assert not M.exact_spectrum_fits(p, memory_budget=need - 1)
    low = B.analyze(model, "ce", (X, y), memory_budget=need - 1, k=6)
    assert not low.exact and low.G_lower_bound and low.spectrum.method == "lanczos"
    assert low.G_label == "lower bound (top-6)" and "lower bound (top-6)" in low.G_text()
    exact = B.analyze(model, "ce", (X, y), memory_budget=need)
    assert exact.exact and exact.G_max.count >= low.G_max.count  # a lower bound
    torch.testing.assert_close(low.spectrum.eigenvalues[:3], exact.spectrum.eigenvalues[:3],
                               rtol=1e-6, atol=1e-9)


def test_alignment_map_forms_agree_with_torch_func():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    vecs = torch.randn(sum(v.numel() for v in model.parameters()), 2, dtype=torch.float32)
    g1 = B.alignment_map(model, (-1.0, 1.0, -2.0, 2.0), vecs, resolution=6)
    xs, ys, pts = B.make_grid((-1.0, 1.0, -2.0, 2.0), 6, dtype=torch.float64)
    g2 = B.alignment_map(model, (xs, ys, pts), vecs)
    assert g1.maps.shape == (2, 6, 6) and torch.equal(g1.pred, g2.pred)
    torch.testing.assert_close(g1.maps, g2.maps)
    G = ref_grads(model, pts)
    V = vecs.double()
    ref = (G @ V) / (G.norm(dim=1, keepdim=True) * V.norm(dim=0, keepdim=True))
    torch.testing.assert_close(g1.maps, ref.T.reshape(2, 6, 6), rtol=1e-9, atol=1e-12)
    # a plane through three inputs (any input shape)
    cnn, X, _ = _cnn_problem()
    v = torch.randn(sum(p.numel() for p in cnn.parameters()), dtype=torch.float64)
    g3 = B.alignment_map(cnn, [X[0], X[1], X[2]], v, resolution=4)
    assert g3.maps.shape == (1, 4, 4) and torch.isfinite(g3.maps).all()
    with pytest.raises(TypeError, match="hbk.boundary.alignment_map: expected an extent"):
        B.alignment_map(model, "grid", vecs)


# ----------------------------------------------------------------------------- files
def test_load_data_file_formats_and_errors(tmp_path):
    X, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.save({"X": X, "y": y, "X_test": X[:2], "y_test": y[:2]}, tmp_path / "a.pt")
    torch.save((X, y), tmp_path / "b.pt")
    np.savez(tmp_path / "c.npz", x=X.numpy().astype(np.float64), y=y.numpy().astype(np.int32))
    torch.save({"X": X, "y": F.one_hot(y).float()}, tmp_path / "d.pt")
    a = B.load_data_file(tmp_path / "a.pt")
    assert torch.equal(a.X, X) and a.X_test.shape == (2, 2) and a.num_classes == 3
    b = B.load_data_file(tmp_path / "b.pt")
    assert b.X_test is None and torch.equal(b.y, y)
    c = B.load_data_file(tmp_path / "c.npz")
    assert c.X.dtype == torch.float64 and c.y.dtype == torch.int64 and torch.equal(c.y, y)
    assert torch.equal(B.load_data_file(tmp_path / "d.pt").y, y)  # one-hot labels
    torch.save({"inputs_": X}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="expected keys X and y"):
        B.load_data_file(tmp_path / "e.pt")
    torch.save((X, y[:3]), tmp_path / "f.pt")
    with pytest.raises(ValueError, match=r"expected y of shape \(6,\)"):
        B.load_data_file(tmp_path / "f.pt")
    (tmp_path / "g.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="damaged"):
        B.load_data_file(tmp_path / "g.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save/load
def test_load_model_file_formats(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(
        "from torch import nn\n"
        "def build(width=4):\n    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), "
        "nn.Linear(width, 3))\n")
    monkeypatch.chdir(tmp_path)
    net = B.build_architecture("usernet:build:width=5")
    assert net[0].out_features == 5
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": net.state_dict(), "epoch": 7}, tmp_path / "ck.pt")
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    x = torch.randn(3, 2)
    for name, fmt in (("sd.pt", "state_dict"), ("ck.pt", "checkpoint"), ("ts.pt", "torchscript")):
        m, meta = B.load_model_file(tmp_path / name, "usernet:build:width=5")
        assert meta["format"] == fmt and isinstance(m, nn.Sequential)
        torch.testing.assert_close(m(x), net(x))
    assert B.load_model_file(tmp_path / "ck.pt", "usernet:build:width=5")[1]["epoch"] == 7
    with pytest.raises(ValueError, match="expected an architecture"):
        B.load_model_file(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="expected weights that fit Sequential"):
        B.load_model_file(tmp_path / "sd.pt", "usernet:build")  # width 4 != 5
    with pytest.raises(ValueError, match="expected an importable module 'nosuchmod'"):
        B.build_architecture("nosuchmod:f")
    with pytest.raises(ValueError, match="expected a callable 'nope'"):
        B.build_architecture("usernet:nope")
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="allow-pickle"):
        B.load_model_file(tmp_path / "whole.pt")
    assert B.load_model_file(tmp_path / "whole.pt", allow_pickle=True)[1]["format"] == "pickled module"


# ----------------------------------------------------------------------------- distributed
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str, budget: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, X, y = _cnn_problem()
        an = B.analyze(model, "ce", (X, y), memory_budget=budget, k=6)
        if rank == 0:
            an.save(f"{out_dir}/dist.json")
        torch.save({"eps": an.eps.eps, "vals": an.spectrum.eigenvalues}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lanczos", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["exact", "lanczos"])
def test_two_ranks_shard_the_data_and_match_one_process(tmp_path, lanczos):
    model, X, y = _cnn_problem()
    p = sum(v.numel() for v in model.parameters())
    budget = M.exact_spectrum_bytes(p) - 1 if lanczos else None
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), budget), nprocs=2,
             join=True)
    two = B.Analysis.load(tmp_path / "dist.json")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    assert r0["eps"] == r1["eps"] and torch.equal(r0["vals"], r1["vals"])  # same on every rank
    one = B.analyze(model, "ce", (X, y), memory_budget=budget, k=6)
    assert two.world_size == 2 and one.world_size == 1 and two.exact == (not lanczos)
    torch.testing.assert_close(two.spectrum.eigenvalues, one.spectrum.eigenvalues,
                               rtol=1e-7, atol=1e-10)
    assert two.eps.eps == pytest.approx(one.eps.eps, rel=1e-8)
    assert two.G_max.count == one.G_max.count and two.G_mean.count == one.G_mean.count
    assert two.trace == pytest.approx(one.trace, rel=1e-6)
    torch.testing.assert_close(two.alignments.abs(), one.alignments.abs(), rtol=1e-5, atol=1e-7)
    assert torch.equal(two.labels, one.labels)


def test_analyze_with_margin_saves_and_loads(tmp_path):
    m, X, y = _saturated_mlp()
    an = B.analyze(m, "ce", (X, y), margin={"steps": 20, "restarts": 2, "seed": 0})
    assert an.margin is not None and an.margin.margin > 0 and "margin estimate" in an.report()
    back = B.Analysis.load(an.save(tmp_path / "a.json"))
    assert back.margin.margin == an.margin.margin and torch.equal(back.margin.x_b, an.margin.x_b)
    with pytest.raises(ValueError, match="expected loss 'ce', 'nll' or 'mse' for the margin"):
        B.analyze(m, F.cross_entropy, (X, y), margin=True)


def test_every_paper_result_type_loads_back(tmp_path):
    """save -> load for each result of hbkernels.boundary (tensors in the .pt beside the JSON)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2)).double()
    X = torch.randn(12, 2, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    an = B.analyze(model, "ce", (X, y))
    spec = B.compute_spectrum(model, (X, y))
    lin = nn.Linear(2, 2).double()  # boundary x_1 = 0 (a finite margin)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        lin.bias.zero_()
    grid = B.alignment_map(model, (-1.0, 1.0, -1.0, 1.0), spec.top(2), resolution=5)
    results = {
        "analysis": an, "spectrum": spec, "grid": grid, "threshold": an.eps, "G": an.G_max,
        "outliers": an.outliers, "spectral_type": an.spectral_type,
        "bulk": an.bulk_outliers,
        "distance": M.boundary_distance(lin, X, (-2.0, 2.0, -2.0, 2.0), resolution=20),
        "reparam": M.reparameterization_report(model, (X, y)),
        "overlap": M.covariance_overlaps(model, (X, y), spec.top(2), spec.eigenvalues[:2]),
    }
    for name, res in results.items():
        back = type(res).load(res.save(tmp_path / f"{name}.json"))
        assert type(back) is type(res), name
        assert json.dumps(back.to_dict(), sort_keys=True, default=str) == json.dumps(
            res.to_dict(), sort_keys=True, default=str), name
    assert torch.equal(B.Spectrum.load(tmp_path / "spectrum.json").eigenvectors, spec.eigenvectors)
    with pytest.raises(ValueError, match="expected a saved Spectrum"):
        B.Spectrum.load(tmp_path / "grid.json")
