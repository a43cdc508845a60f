"""hbk.lanczos against torch.linalg.eigh on explicit symmetric matrices."""

from __future__ import annotations

import _thread
import json
import signal
import warnings

import pytest
import torch

import hbkernels as hbk

pytestmark = pytest.mark.usefixtures("one_thread")

def sym_with_spectrum(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix Q diag(evals) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = evals.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * evals.double()) @ Q.T


def spectra(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rest = torch.rand(n, generator=g, dtype=torch.float64)
    return {
        # 8 outliers well above a bulk in [0, 1]
        "separated": torch.cat([torch.linspace(10, 3, 8, dtype=torch.float64), rest[8:]]),
        # the top 6 within 1e-3 of each other
        "clustered": torch.cat([5 + 1e-3 * rest[:6], rest[6:]]),
        # exact multiplicities 3 and 2 at the top
        "degenerate": torch.cat([torch.tensor([4.0, 4.0, 4.0, 2.5, 2.5], dtype=torch.float64), rest[5:]]),
        # both signs, the negative end larger in magnitude (a saddle's Hessian)
        "negative": torch.cat([torch.linspace(-6, -2, 5, dtype=torch.float64),
                               torch.linspace(2, 4, 4, dtype=torch.float64),
                               2 * rest[9:] - 1]),
    }


def expected(evals: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        return evals.sort(descending=True).values[:k]
    if which == "SA":
        return evals.sort().values[:k]
    return evals[evals.abs().argsort(descending=True)][:k]


def check_pairs(A: torch.Tensor, res: hbk.LanczosResult, want: torch.Tensor, tol: float) -> None:
    """Eigenvalues match, eigenvectors are orthonormal eigenvectors, residuals are honest."""
    k = want.numel()
    scale = A.abs().max().item() * A.shape[0]
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (A.shape[0], k)
    assert res.converged.all()
    # eigenvalue error ~ residual^2 / gap, bounded here by the residual itself
    torch.testing.assert_close(res.eigenvalues, want, atol=10 * tol * scale, rtol=0)
    Y = res.eigenvectors.double()
    torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
    R = A @ Y - Y * res.eigenvalues
    true_res = R.norm(dim=0)
    torch.testing.assert_close(res.residuals, true_res, atol=1e-10 * scale, rtol=1e-6)
    theta1 = res.eigenvalues.abs()[0]
    assert (true_res <= tol * torch.maximum(res.eigenvalues.abs(), theta1) * 1.01 + 1e-12).all()


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", ["separated", "clustered", "degenerate", "negative"])
def test_topk_matches_eigh(name: str, which: str) -> None:
    n, k = 150, 5
    evals = spectra(n)[name]
    A = sym_with_spectrum(evals)
    # one start vector: the repeated eigenvalues of "degenerate" are found by the probe
    res = hbk.lanczos(lambda v: A @ v, n, k, which=which, tol=1e-8, seed=3)
    want = expected(torch.linalg.eigvalsh(A), which, k)
    check_pairs(A, res, want, 1e-8)
    # the ordering convention: LA descending, SA ascending, LM by descending magnitude
    if which == "LA":
        assert (res.eigenvalues.diff() <= 0).all()
    elif which == "SA":
        assert (res.eigenvalues.diff() >= 0).all()
    else:
        assert (res.eigenvalues.abs().diff() <= 1e-12).all()


@pytest.mark.parametrize("block_size", [2, 3])
@pytest.mark.parametrize("name", ["separated", "degenerate"])
def test_block_lanczos(name: str, block_size: int) -> None:
    n, k = 101, 6
    A = sym_with_spectrum(spectra(n)[name])
    calls = []

    def mv(V: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(V.shape))
        return A @ V

    res = hbk.lanczos(mv, n, k, tol=1e-8, seed=0, block_size=block_size, ncv=40)
    check_pairs(A, res, expected(torch.linalg.eigvalsh(A), "LA", k), 1e-8)
    assert all(c == (n, block_size) for c in calls)
    assert res.num_matvecs == block_size * len(calls)


@pytest.mark.parametrize("block_size", [1, 3])
def test_degenerate_eigenvectors_span_the_eigenspace(block_size: int) -> None:
    n = 80
    evals = spectra(n)["degenerate"]
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * evals) @ Q.T
    # one start vector only reaches one direction of the eigenspace (rounding aside): with
    # block_size 1 the other two come from the probes after convergence
    res = hbk.lanczos(lambda v: A @ v, n, 3, tol=1e-10, seed=1, block_size=block_size)
    # the top eigenspace is spanned by Q[:, :3]: the projector onto it keeps every vector
    P = Q[:, :3] @ Q[:, :3].T
    torch.testing.assert_close(P @ res.eigenvectors, res.eigenvectors, atol=1e-7, rtol=0)


def with_bulk(head: list[float], n: int, seed: int = 1) -> torch.Tensor:
    """Eigenvalues: ``head`` followed by a uniform bulk in [0, 1]."""
    rest = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.cat([torch.tensor(head, dtype=torch.float64), rest[len(head):]])


# Repeated eigenvalues with one start vector. In exact arithmetic a single Krylov space holds
# one direction of each eigenspace; before the probe, these cases returned e.g. [4, 3] for
# [4, 4, 3, ...] with k = 2 (every pair flagged converged) in 15 to 20 of 30 settings.
REPEATED = {
    "top2": [4, 4, 3, 2.5, 2],
    "top3": [4, 4, 4, 3, 2.5, 2],
    "mid2": [5, 4, 4, 3, 2.5, 2],          # a pair inside the wanted set
    "mid3": [5, 4.5, 4, 4, 4, 3, 2.5],     # a triple inside the wanted set
    "two_repeats": [4, 4, 4, 3, 3, 2.5],   # multiplicities 3 and 2
}


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("name", sorted(REPEATED))
def test_repeated_eigenvalues_found_to_their_multiplicity(name: str, which: str) -> None:
    n = 80
    head = REPEATED[name]
    for seed, k in enumerate([len(head) - 3, len(head) - 1, len(head) + 1]):
        evals = with_bulk(head, n)
        if which == "SA":
            evals = -evals
        elif which == "LM":  # the repeated values negative, the bulk [0, 1] positive
            evals[: len(head)] *= -1.0
        A = sym_with_spectrum(evals, seed=seed)
        res = hbk.lanczos(A.__matmul__, n, k, which=which, tol=1e-8, seed=seed)
        check_pairs(A, res, expected(torch.linalg.eigvalsh(A), which, k), 1e-8)
        assert res.verify_status == "checked"
        # a repeated eigenvalue's eigenvectors span its eigenspace within the wanted set
        top = float(evals[0])
        mult = sum(1 for h in head[:k] if h == head[0])
        assert int(((res.eigenvalues - top).abs() < 1e-6).sum()) == min(mult, k)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_high_multiplicity_found_by_repeated_probes(which: str) -> None:
    # 5 x 8 and 4 x 6 above a bulk in [0, 3]: one start vector finds each value once; the
    # probes add the missed copies one after another (locked pairs pushed out of the top k
    # are dropped, so the basis keeps room for the next probe)
    n, k = 60, 10
    g = torch.Generator().manual_seed(0)
    evals = torch.cat([torch.full((8,), 5.0), torch.full((6,), 4.0),
                       3 * torch.rand(n - 14, generator=g)]).double()
    A = sym_with_spectrum(-evals if which == "SA" else evals, seed=4)
    res = hbk.lanczos(A.__matmul__, n, k, which=which, tol=1e-10, seed=0)
    check_pairs(A, res, expected(torch.linalg.eigvalsh(A), which, k), 1e-10)
    assert res.verify_status == "checked" and res.probe_found >= 1


def test_repeated_eigenvalues_match_eigsh() -> None:
    sla = pytest.importorskip("scipy.sparse.linalg")
    np = pytest.importorskip("numpy")
    n, k = 120, 4
    A = sym_with_spectrum(with_bulk([4, 4, 4, 3, 2.5], n), seed=2)
    res = hbk.lanczos(lambda v: A @ v, n, k, tol=1e-10, seed=0)
    w = sla.eigsh(A.numpy(), k=k, which="LA", tol=1e-10, v0=np.ones(n), return_eigenvectors=False)
    truth = torch.linalg.eigvalsh(A).flip(0)[:k]
    torch.testing.assert_close(res.eigenvalues, truth, atol=1e-8, rtol=0)
    torch.testing.assert_close(torch.from_numpy(np.sort(w)[::-1].copy()), truth, atol=1e-8, rtol=0)


@pytest.mark.parametrize("which", ["LA", "LM"])
@pytest.mark.parametrize("k", [3, 5, 8])
def test_well_separated_spectra_pay_little_for_the_check(k: int, which: str) -> None:
    n = 300
    A = sym_with_spectrum(spectra(n)["separated"])
    on = hbk.lanczos(lambda v: A @ v, n, k, which=which, tol=1e-8, seed=0)
    off = hbk.lanczos(lambda v: A @ v, n, k, which=which, tol=1e-8, seed=0, verify=False)
    assert off.verify_status == "off" and on.verify_status == "checked"
    assert on.num_probes == 1 and on.probe_found == 0
    # the probe is the only difference: same main phase, a few products more
    assert on.main_matvecs == off.num_matvecs
    assert on.num_matvecs - off.num_matvecs <= 10
    torch.testing.assert_close(on.eigenvalues, off.eigenvalues, atol=1e-10, rtol=0)


def test_no_room_for_the_check_warns() -> None:
    n = 60
    A = sym_with_spectrum(with_bulk([4, 4, 3, 2.5], n))
    with pytest.warns(RuntimeWarning, match="check for missed .* did not finish: ncv=4"):
        res = hbk.lanczos(lambda v: A @ v, n, 3, ncv=4, seed=0, tol=1e-8, max_matvecs=5000)
    assert res.verify_status == "no_room" and res.all_converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = hbk.lanczos(lambda v: A @ v, n, 3, ncv=4, seed=0, tol=1e-8, max_matvecs=5000,
                          verify=False)
    assert res.verify_status == "off"


def test_full_basis_needs_no_check() -> None:
    n = 30
    A = sym_with_spectrum(with_bulk([4, 4, 4, 3], n))
    res = hbk.lanczos(lambda v: A @ v, n, 29, seed=0, tol=1e-10)
    check_pairs(A, res, torch.linalg.eigvalsh(A).flip(0)[:29], 1e-10)
    assert res.verify_status in ("checked", "complete")


@pytest.mark.parametrize("k", [1, 38, 40])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_k_one_and_close_to_dim(k: int, which: str) -> None:
    n = 40
    evals = torch.linspace(-3, 2, n, dtype=torch.float64)
    A = sym_with_spectrum(evals, seed=5)
    res = hbk.lanczos(lambda v: A @ v, n, k, which=which, tol=1e-10, seed=0)
    check_pairs(A, res, expected(evals, which, k), 1e-10)


def test_float32_basis() -> None:
    n = 97  # odd size
    A = sym_with_spectrum(spectra(n)["separated"]).float()
    res = hbk.lanczos(lambda v: A @ v, n, 4, tol=1e-5, dtype=torch.float32, seed=0)
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvalues.dtype == torch.float64
    want = torch.linalg.eigvalsh(A.double()).flip(0)[:4]
    torch.testing.assert_close(res.eigenvalues, want, atol=1e-4, rtol=0)
    assert res.converged.all()


def test_hbk_uses_fewer_or_equal_matvecs_than_needed_by_a_full_basis() -> None:
    # a fast-converging spectrum must stop well before dim products
    n = 300
    A = sym_with_spectrum(spectra(n)["separated"])
    res = hbk.lanczos(lambda v: A @ v, n, 3, tol=1e-6, seed=0)
    assert res.num_matvecs < 60 and res.all_converged


def test_seed_and_v0_reproducible() -> None:
    n = 60
    A = sym_with_spectrum(spectra(n)["separated"])
    r1 = hbk.lanczos(lambda v: A @ v, n, 3, seed=7)
    r2 = hbk.lanczos(lambda v: A @ v, n, 3, seed=7)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_matvecs == r2.num_matvecs
    v0 = torch.ones(n, dtype=torch.float64)
    r3 = hbk.lanczos(lambda v: A @ v, n, 3, v0=v0)
    r4 = hbk.lanczos(lambda v: A @ v, n, 3, v0=v0)
    assert torch.equal(r3.eigenvectors, r4.eigenvectors)


def test_store_products_off_costs_k_products() -> None:
    n = 70
    A = sym_with_spectrum(spectra(n)["separated"])
    r1 = hbk.lanczos(lambda v: A @ v, n, 4, seed=2)
    r2 = hbk.lanczos(lambda v: A @ v, n, 4, seed=2, store_products=False)
    assert r2.num_matvecs == r1.num_matvecs + 4
    torch.testing.assert_close(r1.eigenvalues, r2.eigenvalues, atol=1e-12, rtol=0)
    torch.testing.assert_close(r1.residuals, r2.residuals, atol=1e-9, rtol=0)


def test_non_convergence_is_reported() -> None:
    n = 200
    evals = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = sym_with_spectrum(evals)  # a dense bulk: slow convergence
    with pytest.warns(RuntimeWarning, match="converged"):
        res = hbk.lanczos(lambda v: A @ v, n, 5, tol=1e-12, max_matvecs=30, seed=0)
    assert res.num_matvecs <= 30
    assert not res.converged.all()
    assert torch.isfinite(res.eigenvalues).all()
    # the residuals are the true ones, and the flags agree with them
    true_res = (A @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
    torch.testing.assert_close(res.residuals, true_res, atol=1e-10, rtol=1e-6)
    bound = 1e-12 * torch.maximum(res.eigenvalues.abs(), res.eigenvalues.abs()[0])
    assert not (res.converged & (res.residuals > bound)).any()


class MatvecError(Exception):
    pass


def test_matvec_exception_propagates_unchanged() -> None:
    n = 30
    A = sym_with_spectrum(torch.linspace(0, 1, n, dtype=torch.float64))
    err = MatvecError("boom at call 4")
    count = [0]

    def mv(v):
        count[0] += 1
        if count[0] == 4:
            raise err
        return A @ v

    with pytest.raises(MatvecError) as info:
        hbk.lanczos(mv, n, 2, seed=0)
    assert info.value is err and str(info.value) == "boom at call 4"
    assert count[0] == 4


def test_keyboard_interrupt_stops_the_run() -> None:
    n = 200
    A = sym_with_spectrum(torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    count = [0]

    def mv(v):
        count[0] += 1
        if count[0] == 5:
            _thread.interrupt_main()  # a pending SIGINT, as from Ctrl-C
        return A @ v

    # A process started in the background (as CI may be) inherits SIGINT ignored, and then
    # interrupt_main() does nothing: install Python's handler for the duration of the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            hbk.lanczos(mv, n, 5, tol=1e-12, seed=0)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert 5 <= count[0] <= 6


def test_bad_matvec_results() -> None:
    n = 20
    with pytest.raises(TypeError, match="hbk.lanczos: expected matvec to return a torch.Tensor, got list"):
        hbk.lanczos(lambda v: [1.0], n, 2)
    with pytest.raises(ValueError, match=r"hbk.lanczos: expected matvec to return a tensor of shape \(20,\)"):
        hbk.lanczos(lambda v: torch.zeros(3, dtype=torch.float64), n, 2)
    with pytest.raises(ValueError, match=r"shape \(20, 2\)"):
        hbk.lanczos(lambda v: v[:, :1], n, 2, block_size=2)
    with pytest.raises(ValueError, match="hbk.lanczos: expected matvec to return finite values, got NaN"):
        hbk.lanczos(lambda v: v * float("nan"), n, 2)
    with pytest.raises(ValueError, match="expected matvec to return finite values"):
        hbk.lanczos(lambda v: v * float("inf"), n, 2)
    with pytest.raises(TypeError, match="expected matvec to return a floating-point tensor, got Long"):
        hbk.lanczos(lambda v: torch.ones(n, dtype=torch.int64), n, 2)
    with pytest.raises(TypeError, match="expected matvec to return a tensor on the basis device cpu"):
        hbk.lanczos(lambda v: torch.empty(n, device="meta"), n, 2)
    with pytest.raises(TypeError, match="expected matvec to return a torch.Tensor, got NoneType"):
        hbk.lanczos(lambda v: None, n, 2)
    # a finite first product and a NaN later one: still refused
    count = [0]

    def late_nan(v):
        count[0] += 1
        return v * (float("nan") if count[0] == 7 else 2.0)

    with pytest.raises(ValueError, match="finite values"):
        hbk.lanczos(late_nan, n, 2, seed=0, tol=1e-12)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"k": 0}, ValueError, "expected k >= 1, got 0"),
        ({"k": 21}, ValueError, "expected k <= 20, got 21"),
        ({"k": 2.0}, TypeError, "expected k to be an int, got 2.0"),
        ({"k": True}, TypeError, "expected k to be an int, got True"),
        ({"dim": 0}, ValueError, "expected dim >= 1, got 0"),
        ({"dim": "20"}, TypeError, "expected dim to be an int, got '20'"),
        ({"which": "BE"}, ValueError, "expected which to be one of \\('LA', 'SA', 'LM'\\), got 'BE'"),
        ({"which": 1}, TypeError, "expected which to be one of"),
        ({"tol": 0.0}, ValueError, "expected tol > 0.0, got 0.0"),
        ({"tol": -1e-6}, ValueError, "expected tol > 0.0"),
        ({"tol": float("nan")}, ValueError, "expected tol to be finite, got nan"),
        ({"tol": float("inf")}, ValueError, "expected tol to be finite"),
        ({"tol": 1.0}, ValueError, "expected tol < 1.0, got 1.0"),
        ({"tol": "1e-6"}, TypeError, "expected tol to be a real number, got '1e-6'"),
        ({"dtype": torch.int64}, TypeError, "expected dtype float32 or float64, got torch.int64"),
        ({"dtype": "float64"}, TypeError, "expected dtype float32 or float64"),
        ({"ncv": 2}, ValueError, "expected k \\+ block_size <= ncv <= dim"),
        ({"ncv": 21}, ValueError, "expected ncv <= 20, got 21"),
        ({"ncv": 3.0}, TypeError, "expected ncv to be an int"),
        ({"block_size": 0}, ValueError, "expected block_size >= 1, got 0"),
        ({"block_size": 21}, ValueError, "expected block_size <= 20, got 21"),
        ({"block_size": "2"}, TypeError, "expected block_size to be an int"),
        ({"max_matvecs": 0}, ValueError, "expected max_matvecs >= 1, got 0"),
        ({"max_matvecs": 3, "block_size": 4, "ncv": 10}, ValueError, "expected max_matvecs >= 4"),
        ({"max_matvecs": 100.0}, TypeError, "expected max_matvecs to be an int"),
        ({"seed": "abc"}, TypeError, "hbk.lanczos: expected seed to be an int, got 'abc'"),
        ({"seed": -1}, ValueError, "expected seed >= 0, got -1"),
        ({"seed": 2**64}, ValueError, "expected seed <= "),
        ({"seed": 1.5}, TypeError, "expected seed to be an int"),
        ({"v0": torch.ones(5)}, ValueError, r"expected v0 of shape \(20,\) or \(20, c\)"),
        ({"v0": torch.ones(20, 2)}, ValueError, "with 1 <= c <= block_size = 1"),
        ({"v0": torch.ones(20, 1, 1)}, ValueError, "expected v0 to be 1-D or 2-D"),
        ({"v0": torch.zeros(20)}, ValueError, "expected a nonzero v0"),
        ({"v0": torch.full((20,), float("nan"))}, ValueError, "expected a finite v0, got NaN or inf"),
        ({"v0": torch.ones(20, dtype=torch.int64)}, TypeError, "expected v0 to be a floating-point tensor"),
        ({"v0": [1.0] * 20}, TypeError, "expected v0 to be a torch.Tensor, got list"),
        ({"device": "nope"}, ValueError, "expected device to be a valid device name"),
        ({"device": 3}, TypeError, "expected device to be None, a str or a torch.device"),
        ({"quiet": "no"}, TypeError, "expected quiet to be True or False, got 'no'"),
        ({"store_products": 1}, TypeError, "expected store_products to be True or False"),
        ({"verify": "yes"}, TypeError, "expected verify to be True or False"),
        ({"reorth": "once"}, ValueError, "expected reorth to be one of"),
    ],
)
def test_input_validation(kwargs, exc, msg) -> None:
    A = torch.eye(20, dtype=torch.float64)
    args = {"k": 2, "dim": 20}
    args.update(kwargs)
    calls = [0]

    def mv(v):
        calls[0] += 1
        return A @ v

    with pytest.raises(exc, match=msg) as info:
        hbk.lanczos(mv, **args)
    assert str(info.value).startswith("hbk.lanczos: expected ")
    assert calls[0] == 0  # refused before any work


def test_matvec_not_callable() -> None:
    with pytest.raises(TypeError, match="hbk.lanczos: expected matvec to be callable, got a tensor"):
        hbk.lanczos(torch.eye(3), 3, 1)


def test_zero_operator() -> None:
    res = hbk.lanczos(lambda v: torch.zeros_like(v), 12, 2, seed=0)
    assert res.all_converged and torch.equal(res.eigenvalues, torch.zeros(2, dtype=torch.float64))


def test_result_json(tmp_path) -> None:
    n = 25
    A = sym_with_spectrum(torch.linspace(1, 2, n, dtype=torch.float64))
    res = hbk.lanczos(lambda v: A @ v, n, 2, seed=0, quiet=False)
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert len(d["eigenvectors"]) == n and len(d["eigenvectors"][0]) == 2
    assert d["verify_status"] == "checked" and d["profile"]["orth_seconds"] >= 0
    path = res.save(tmp_path / "r.json", include_vectors=False)
    loaded = hbk.LanczosResult.load(path)
    assert loaded.num_matvecs == res.num_matvecs and loaded.eigenvectors.shape == (n, 0)
    assert loaded.verify_status == res.verify_status and loaded.main_matvecs == res.main_matvecs
    torch.testing.assert_close(loaded.eigenvalues, res.eigenvalues, rtol=0, atol=0)
    assert 0.0 <= res.overhead_fraction <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hbk.lanczos(lambda v: A @ v, n, 2, seed=0)  # converged: no warning
