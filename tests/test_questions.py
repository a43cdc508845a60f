"""boundary.questions: the fidelity experiments on tiny models and constructed spectra."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from hbkernels.boundary import measures as M
from hbkernels.boundary import questions as Q
from hbkernels.boundary.experiments import Settings
from hbkernels.boundary.models import make_model
from hbkernels.params import flatten_params

TINY = Settings(width=4, epochs_scale=0.01)  # 20 normal epochs: the numbers mean nothing


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


# ----------------------------------------------------------------------------- result + markdown
def test_result_roundtrip_and_markdown(tmp_path):
    r = Q.QuestionResult(name="x", title="T", question="q?", answer="a 0.125",
                         command="hbk reproduce questions --only x",
                         tables={"Per seed:": [{"seed": 0, "G": 0.125, "ok": True, "v": None},
                                               {"seed": 1, "G": 1e-7, "extra": (1.0, 2.0)}]},
                         summary={"k": 1.5}, settings={"seeds": [0, 1]}, seconds=2.0)
    js, md = r.write(tmp_path)
    back = Q.QuestionResult.load(js)
    assert back.tables == json.loads(json.dumps(r.tables, default=list)) or back.answer == r.answer
    assert back.summary == {"k": 1.5} and back.answer == "a 0.125"
    text = md.read_text()
    assert text == r.to_markdown()
    # every column of every row, missing cells as a dash, small numbers in e-notation
    assert "| seed | G | ok | v | extra |" in text
    assert "| 0 | 0.125 | yes | — | — |" in text
    assert "| 1 | 1.000e-07 | — | — | (1, 2) |" in text
    assert "`hbk reproduce questions --only x`" in text


# ----------------------------------------------------------------------------- bulk: constructed
def _constructed(width: int, C: int = 3, scale: float = 1.0) -> torch.Tensor:
    """A bulk of 20 * width values evenly over [-0.01, 0.01] * scale * width plus C - 1
    outliers at 10, 20, ... (far above the bulk)."""
    bulk = torch.linspace(-1, 1, 20 * width, dtype=torch.float64) * 0.01 * scale * width
    return torch.cat([bulk, torch.arange(1, C, dtype=torch.float64) * 10.0]).flip(0)


def test_bulk_row_on_constructed_spectra():
    ev = _constructed(8)
    row = Q._bulk_row(ev, 3, width=8, seed=0)
    assert row["outliers"] == 2 and row["C or C-1"] is True
    assert row["bulk width"] == pytest.approx(2 * 0.08, rel=1e-12)
    bulk = ev[ev < 1]
    assert row["bulk std"] == pytest.approx(float(bulk.std()), rel=1e-12)
    assert row["lambda_max"] == 20.0 and row["p"] == ev.numel()
    assert row["outlier share of trace"] == pytest.approx(30.0 / float(ev.sum()), rel=1e-12)


def test_bulk_summary_slopes_on_constructed_spectra():
    widths = [8, 16, 32, 64]
    rows = [Q._bulk_row(_constructed(w), 3, width=w, seed=s) for w in widths for s in (0, 1)]
    s = Q._bulk_summary(rows, widths, 3)
    assert s["bulk_width_slope"] == pytest.approx(1.0, abs=1e-9)  # bulk spread ~ width
    assert s["lambda_max_slope"] == pytest.approx(0.0, abs=1e-9)  # outliers fixed
    assert s["outliers_slope"] == pytest.approx(0.0, abs=1e-12)
    assert s["match_classes"] == len(rows)
    assert s["outliers_mean"] == {w: 2.0 for w in widths}
    assert [t["width"] for t in s["table"]] == widths


def test_slope_ignores_non_positive():
    assert Q._slope([1, 2, 4], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert Q._slope([1, 2], [0.0, 1.0]) is None


def test_bulk_scaling_tiny_sweep_against_autograd(tmp_path):
    r = Q.bulk_scaling(tmp_path, seeds=(0,), widths=(2, 3), settings=TINY,
                       figure=tmp_path / "bulk.png")
    assert (tmp_path / "bulk.png").stat().st_size > 0 and (tmp_path / "bulk.pdf").exists()
    rows = r.tables["Per seed:"]
    assert [x["width"] for x in rows] == [2, 3]
    # ground truth: the spectrum of the autograd Hessian of the same cached model
    res = Q._train("gauss", "normal", [0], TINY, tmp_path, width=3)[0]
    m = M.as_dtype_model(res.model, torch.float64)
    from hbkernels.boundary.datasets import load_dataset

    ds = load_dataset("gauss")
    X, y = ds.X_train.double(), ds.y_train
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta = flatten_params(m).detach().double()

    def loss(flat):
        parts, i = {}, 0
        for n, sh in zip(names, shapes):
            k = int(np.prod(sh))
            parts[n] = flat[i:i + k].reshape(sh)
            i += k
        out = torch.func.functional_call(m, parts, (X,))
        return nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, theta)
    ev = torch.linalg.eigvalsh(H)
    assert rows[1]["p"] == ev.numel()
    assert rows[1]["lambda_max"] == pytest.approx(float(ev.max()), rel=1e-8)
    ref = Q._bulk_row(ev, 3, width=3, seed=0)
    assert rows[1]["outliers"] == ref["outliers"]
    assert rows[1]["bulk width"] == pytest.approx(ref["bulk width"], rel=1e-6, abs=1e-12)
    assert "bulk.png" in r.to_markdown()


# ----------------------------------------------------------------------------- alpha
def test_reparam_scales_match_the_reparameterisation():
    m = make_model("fnn2", 2, 3, width=5, seed=1, dtype=torch.float64)
    al = (0.2, 5.0, 1.0)
    D = Q._reparam_scales(m, al)
    th, th2 = flatten_params(m).double(), flatten_params(M.reparameterize(m, al)).double()
    torch.testing.assert_close(th2, D * th, rtol=1e-15, atol=0)
    assert sorted(set(D.tolist())) == [0.2, 1.0, 5.0]


def test_alpha_invariance_tiny(tmp_path):
    r = Q.alpha_invariance(tmp_path, seeds=(0,), alphas=((0.2, 5.0, 1.0), (0.3, 2.0, 1 / 0.6)),
                           settings=TINY)
    s = r.summary
    assert s["max_output_diff"] < 1e-12
    assert s["analyze_vs_direct_max_diff"] < 1e-12  # the direct route is analyze's convention
    # D H' D with gradients D g' is the original problem: spectrum, eps and G come back
    assert s["eig_corrected_max_rel_err"] < 1e-10
    assert s["eps_corrected_max_change"] < 1e-10
    assert s["G_max_corrected_max_change"] == 0 and s["G_mean_corrected_max_change"] == 0
    rows = r.tables["Per seed:"]
    assert [x["view"] for x in rows].count("H' (as analysed)") == 2
    naive = [x for x in rows if x["view"] == "H' (as analysed)"]
    orig = rows[0]
    # the Hessian itself is not invariant (that is the point of the reparameterisation)
    assert all(abs(x["lambda_max"] - orig["lambda_max"]) > 1e-6 for x in naive)
    assert "D H' D" in r.answer and r.name == "alpha"


def test_alpha_invariance_bad_alphas(tmp_path):
    with pytest.raises(ValueError, match="product 1"):
        Q.alpha_invariance(tmp_path, seeds=(0,), alphas=((1.0, 2.0, 1.0),), settings=TINY)
    with pytest.raises(TypeError, match="seeds"):
        Q.alpha_invariance(tmp_path, seeds=0, settings=TINY)


# ----------------------------------------------------------------------------- margin
def test_margin_reliability_restart_subsets(tmp_path):
    from hbkernels.boundary.margin import estimate_margin

    r = Q.margin_reliability(tmp_path, seeds=(0,), restarts=(1, 3), steps=(5,), settings=TINY)
    rows = r.tables["Per seed:"]
    assert len(rows) == 4  # 2 setups x 1 seed x 1 steps x 2 restart counts
    from hbkernels.boundary.datasets import load_dataset

    ds = load_dataset("checkerboard-linear")
    res = Q._train("checkerboard-linear", "normal", [0], TINY, tmp_path)[0]
    m = M.as_dtype_model(res.model, torch.float64)
    data = (ds.X_train.double(), ds.y_train)
    u = Q._top_vector(m, data)
    mr = estimate_margin(m, data, u, restarts=3, steps=5, seed=0)
    got = {x["restarts"]: x["estimate"] for x in rows if x["setup"] == "normal"}
    assert got[3] == pytest.approx(mr.margin, rel=1e-6)  # all restarts: the search's pick
    k = 0  # one restart: the first one
    assert got[1] == pytest.approx(mr.restart_margin[k], rel=1e-6)
    assert r.summary["truth_order_right"] in (0, 1)
    assert all(math.isfinite(x["grid margin"]) for x in rows)


# ----------------------------------------------------------------------------- precision
def test_precision_tiny(tmp_path):
    r = Q.precision(tmp_path, seeds=(0,), setups=("normal",), settings=TINY)
    rows = r.tables["Per seed:"]
    assert {(x["dtype"], x["round-off rule"]) for x in rows} == {
        ("float64", True), ("float64", False), ("float32", True), ("float32", False)}
    ref = Q._train("gauss", "normal", [0], TINY, tmp_path)[0]
    from hbkernels.boundary.datasets import load_dataset

    an = M.analyze(ref.model, load_dataset("gauss").train_data())  # float64, rule on: default
    f64 = next(x for x in rows if x["dtype"] == "float64" and x["round-off rule"])
    assert f64["G_max"] == an.G_max.value and f64["eps"] == pytest.approx(an.eps.eps, rel=1e-12)
    cmp = r.tables["float64 vs float32 (max over seeds):"]
    assert len(cmp) == 2 and all(c["max |ΔG_max|"] >= 0 for c in cmp)


# ----------------------------------------------------------------------------- large norm
def test_large_norm_scaled_factor_one_is_the_large_norm_setup(tmp_path):
    ln = Q._train("circle", "large-norm", [0, 1], TINY, tmp_path, width=3,
                  epochs={"large-norm": 7})
    mine = Q._large_norm_scaled("circle", [0, 1], TINY, tmp_path, width=3, epochs=7, factor=1.0)
    for a, b in zip(ln, mine):
        torch.testing.assert_close(flatten_params(a.model), flatten_params(b.model))
    half = Q._large_norm_scaled("circle", [0], TINY, tmp_path, width=3, epochs=0, factor=0.5)[0]
    parent = Q._train("circle", "random-label", [0], TINY, tmp_path, width=3)[0]
    assert M.parameter_norm(half.model) == pytest.approx(0.5 * parent.param_norm, rel=1e-5)


def test_large_norm_causes_tiny(tmp_path):
    r = Q.large_norm_causes(tmp_path, seeds=(0,), widths=(3,), epochs=(5, 10),
                            factors=(0.5, 1.0), settings=TINY)
    mean = r.tables["Mean ± std over seeds:"]
    assert [(x["setup"], x["LN epochs"], x["norm factor"]) for x in mean] == [
        ("normal", None, None), ("large-norm", 5, 1.0), ("large-norm", 10, 1.0),
        ("large-norm", 5, 0.5)]
    assert set(r.summary["large_norm_above_normal"]) == {"w3/e5/x1.0", "w3/e10/x1.0",
                                                          "w3/e5/x0.5"}
    assert "Collapsed Hessians" in r.answer


# ----------------------------------------------------------------------------- runner + CLI
def test_run_questions_rejects_unknown(tmp_path):
    with pytest.raises(ValueError, match="question names"):
        Q.run_questions(tmp_path, only=["nope"])


def test_cli_reproduce_questions_alpha(tmp_path, capsys):
    from hbkernels import cli

    assert cli.main(["reproduce", "questions", "--only", "alpha", "--seeds", "1", "--width", "3",
                     "--epochs-scale", "0.01", "--out", str(tmp_path)]) == 0
    dest = tmp_path / "questions"
    assert (dest / "alpha.json").exists() and (dest / "alpha.md").exists()
    assert "alpha-reparameterisation" in (dest / "report.md").read_text()
    assert Q.QuestionResult.load(dest / "alpha.json").settings["width"] == 3
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "questions", "--only", "nope"])


def test_bulk_widths():
    assert Q.bulk_widths(Settings()) == (8, 16, 32, 64)
    assert Q.bulk_widths(Settings(width=6)) == (2, 3, 6)
    assert Q.bulk_widths(Settings(width=64)) == (8, 16, 32, 64)
