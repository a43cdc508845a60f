"""Experiments layer: schedules, resumable run store, summaries and ordering checks."""

from __future__ import annotations

import json

import pytest

from hbkernels.boundary import experiments as E
from hbkernels.boundary import measures as M

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=6, epochs_scale=0.002, resolution=12, k_maps=2, margin_steps=20,
            margin_restarts=2)


def test_phase_epochs_profiles():
    b = E.phase_epochs("gauss", E.Settings())
    assert b == {"normal": 2000, "random-label": 40000, "adversarial": 2000, "large-norm": 1000}
    assert E.phase_epochs("circle", E.Settings())["random-label"] == 20000  # min(reference, 40k)
    assert E.phase_epochs("iris", E.Settings())["random-label"] == 200000  # not capped
    r = E.phase_epochs("gauss", E.Settings(profile="reference"))
    assert r == {"normal": 2000, "random-label": 300000, "adversarial": 20000, "large-norm": 1000}
    o = E.phase_epochs("gauss", E.Settings(epochs={"normal": 10}, epochs_scale=0.5))
    assert o["normal"] == 5 and o["random-label"] == 20000
    assert E.Settings().width_for("gauss") == 50 and E.Settings(profile="reference").width_for("gauss") is None
    assert E.Settings(width=7).width_for("digits-017") is None  # fixed CNN
    with pytest.raises(ValueError, match="rule"):
        E.Settings(rule="median")
    with pytest.raises(ValueError, match="epochs keys"):
        E.Settings(epochs={"warmup": 3})


def _row(dataset, setup, seed, G, trace, margin=None):
    return {"dataset": dataset, "setup": setup, "seed": seed, "G": G, "G_mean": None if G is None else G / 10,
            "trace": trace, "lambda_max": trace / 2, "param_norm": 1.0 + seed, "train_acc": 1.0,
            "test_acc": 0.9, "eps": 0.03, "num_outliers": 2, "margin": margin,
            "collapsed": G is None}


def test_summary_and_ordering_checks_on_constructed_rows():
    rows = [_row("gauss", "normal", 0, 0.05, 0.2), _row("gauss", "normal", 1, 0.07, 0.3),
            _row("gauss", "adversarial", 0, 0.15, 0.01), _row("gauss", "adversarial", 1, 0.06, 0.02),
            _row("gauss", "large-norm", 0, None, 1e-9), _row("gauss", "large-norm", 1, 0.09, 0.1),
            _row("checkerboard-linear", "normal", 0, 0.05, 0.2, margin=0.4),
            _row("checkerboard-linear", "wide-margin", 0, 0.04, 0.03, margin=0.6)]
    s = E.summarize(rows)
    assert s["gauss"]["normal"]["G"]["mean"] == pytest.approx(0.06)
    assert s["gauss"]["normal"]["G"]["std"] == pytest.approx(0.01)
    assert s["gauss"]["large-norm"]["G"]["n"] == 1 and s["gauss"]["large-norm"]["collapsed"] == 1
    c = E.ordering_checks(rows, s)
    adv = c["gauss"]["adversarial"]["G"]
    assert adv["normal_lower"] is True and adv["seeds_normal_lower"] == 1 and adv["pairs"] == 2
    assert adv["paper_order_holds"] is True
    assert c["checkerboard-linear"]["wide-margin"]["G"]["paper_order_holds"] is True  # wide lower
    assert c["gauss"]["adversarial"]["trace"]["normal_lower"] is False
    assert c["gauss"]["large-norm"]["G"]["pairs"] == 1  # the collapsed seed is left out
    m = c["checkerboard-linear"]["wide-margin"]["margin"]
    assert m["wide_larger"] is True and m["seeds_wide_larger"] == 1
    json.dumps(c)


def test_run_grid_resumes_and_rekeys(tmp_path):
    settings = E.Settings(**TINY)
    rows, models = E.run_grid(["gauss"], ["normal"], [0], settings, tmp_path, quiet=True)
    assert len(rows) == 1 and set(models) == {"gauss--normal--seed0"}
    r = rows[0]
    for key in ("setup", "dataset", "seed", "G", "G_rule", "eps", "trace", "lambda_max",
                "param_norm", "train_acc", "test_acc"):
        assert key in r
    arr = E.RunStore(tmp_path).arrays("gauss--normal--seed0")
    assert arr["top_vectors"].shape[0] == r["num_params"] and arr["alignments"].shape[0] == 150
    assert r["trace"] == pytest.approx(float(arr["eigenvalues"].sum()), rel=1e-9)
    again, models2 = E.run_grid(["gauss"], ["normal"], [0], settings, tmp_path, quiet=True)
    assert models2 == {} and again == rows  # resumed from disk, nothing recomputed
    other, models3 = E.run_grid(["gauss"], ["normal"], [0], E.Settings(**TINY, rule="mean"),
                                tmp_path, quiet=True)
    assert set(models3) == {"gauss--normal--seed0"} and other[0]["G_rule"] == "mean"


def test_table1_checkerboard_with_margins(tmp_path):
    settings = E.Settings(**TINY)
    payload = E.table1(tmp_path, datasets=["checkerboard-linear"], seeds=[0], settings=settings,
                       quiet=True)
    setups = {r["setup"] for r in payload["runs"]}
    assert setups == {"normal", "adversarial", "large-norm", "wide-margin"}
    marg = {r["setup"]: r.get("margin") for r in payload["runs"]}
    assert marg["normal"] > 0 and marg["wide-margin"] > 0 and marg["adversarial"] is None
    # the ground-truth margin is recorded (None = infinite: a tiny model may predict one class)
    for r in payload["runs"]:
        if r["setup"] in ("normal", "wide-margin"):
            assert "grid_margin" in r and (r["grid_margin"] is None or r["grid_margin"] >= 0)
    assert "margin" in payload["checks"]["checkerboard-linear"]["wide-margin"]
    text = (tmp_path / "table1" / "report.md").read_text()
    assert "checkerboard-linear" in text and "wide-margin" in text


@pytest.mark.slow
def test_figures_gauss_tiny(tmp_path):
    settings = E.Settings(**TINY)
    payload = E.figures(tmp_path, datasets=["gauss"], seed=0, settings=settings, quiet=True,
                        digits=None, dynamics_epochs=(0, 2, 4))
    files = {f["file"] for f in payload["figures"]}
    assert {"boundaries.png", "gauss_alignment_maps.png", "random_directions.png", "per_class.png",
            "dynamics.png", "reparameterization.png", "covariance.png"} <= files
    for f in files:
        assert (tmp_path / "figures" / f).stat().st_size > 2000
    rep = payload["reports"]["reparameterization"]
    assert rep["predictions_equal"] and rep["max_abs_output_diff"] < 1e-8
    assert len(payload["reports"]["covariance_overlaps"]["betas"]) == 5
    # the appendix analyses (tests/test_appendix.py checks their values)
    assert {"scalar_product_maps.png", "gradient_coherence.png"} <= files
    reports = payload["reports"]
    assert set(reports["direction_families"]["families"]) == {
        "top", "bottom", "random_eigenvectors", "random_directions"}
    assert (tmp_path / "figures" / "direction_families.json").exists()
    assert set(reports["gradient_coherence"]) == {"normal", "adversarial"}
    assert set(reports["per_class"]) == {"0", "1", "2"} and "scalar_product" in reports
    assert "App. E" in (tmp_path / "figures" / "report.md").read_text()


def test_run_arrays_are_small(tmp_path):
    E.run_grid(["gauss"], ["normal"], [0], E.Settings(**{**TINY, "width": 20}), tmp_path,
               quiet=True)
    arr = E.RunStore(tmp_path).arrays("gauss--normal--seed0")
    p = arr["eigenvalues"].numel()
    # top-25 vectors (p = 543: 109 kB), not the (p, p) storage they were sliced from (2.4 MB)
    assert (tmp_path / "runs" / "gauss--normal--seed0.pt").stat().st_size < 8 * p * 40 + 100_000


@pytest.mark.parametrize("kw, exc, msg", [
    ({"epochs_scale": float("nan")}, ValueError, "epochs_scale to be finite"),
    ({"epochs_scale": float("inf")}, ValueError, "epochs_scale to be finite"),
    ({"epochs_scale": 0}, ValueError, "epochs_scale > 0"),
    ({"width": 0}, ValueError, "width >= 1"),
    ({"width": 2.5}, TypeError, "width to be an int"),
    ({"profile": "fast"}, ValueError, "profile to be one of"),
    ({"max_exact_params": 0}, ValueError, "max_exact_params >= 1"),
    ({"num_directions": 0}, ValueError, "num_directions >= 1"),
    ({"resolution": 1}, ValueError, "resolution >= 2"),
    ({"margin_steps": -1}, ValueError, "margin_steps >= 1"),
    ({"epochs": {"normal": -1}}, ValueError, "epochs\\['normal'\\] >= 0"),
    ({"epochs": {"normal": 1.5}}, TypeError, "epochs\\[.normal.\\] to be an int"),
    ({"dtype": "float16"}, ValueError, "dtype to be one of"),
])
def test_settings_refuse_bad_values(kw, exc, msg):
    with pytest.raises(exc, match=f"hbk.boundary.Settings: expected {msg}"):
        E.Settings(**kw)


def test_names_and_data_are_checked_before_any_work(tmp_path, monkeypatch):
    from hbkernels.boundary import training as T

    def no_work(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(T, "train_setups", no_work)
    monkeypatch.setattr(E, "train_setups", no_work)
    s = E.Settings(**TINY)
    with pytest.raises(ValueError, match="hbk.boundary.figures: expected datasets from"):
        E.figures(tmp_path, datasets=["nope"], settings=s, quiet=True)
    with pytest.raises(ValueError, match="hbk.boundary.figures: expected distinct class digits"):
        E.figures(tmp_path, datasets=["gauss"], digits="digits-x", settings=s, quiet=True)
    with pytest.raises(ValueError, match="hbk.boundary.table1: expected datasets from"):
        E.table1(tmp_path, datasets=["iris"], settings=s, quiet=True)
    with pytest.raises(ValueError, match="hbk.boundary.table2: expected a dataset name"):
        E.table2(tmp_path, datasets=["nope"], settings=s, quiet=True)
    with pytest.raises(ValueError, match="hbk.boundary.run_grid: expected setup to be one of"):
        E.run_grid(["gauss"], ["sharp"], [0], s, tmp_path, quiet=True)
    with pytest.raises(ValueError, match="hbk.boundary.run_grid: expected distinct seeds"):
        E.run_grid(["gauss"], ["normal"], [0, 0], s, tmp_path, quiet=True)
    with pytest.raises(TypeError, match="hbk.boundary.run_grid: expected datasets to be"):
        E.run_grid("gauss", ["normal"], [0], s, tmp_path, quiet=True)
    monkeypatch.setenv("HBK_DATA", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="MNIST test files"):  # iris is never trained
        E.run_grid(["iris", "mnist-017"], ["normal"], [0], s, tmp_path, quiet=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="expected a writable"):
        E.run_grid(["gauss"], ["normal"], [0], s, blocker, quiet=True)


def test_an_older_run_without_the_tensor_norm_sum_gets_it_from_its_cached_model(tmp_path):
    settings = E.Settings(**TINY)
    rows, models = E.run_grid(["gauss"], ["normal"], [0], settings, tmp_path, quiet=True)
    want = M.parameter_norm_sum(models["gauss--normal--seed0"].model)
    assert rows[0]["param_norm_sum"] == pytest.approx(want)
    store = E.RunStore(tmp_path)
    name = "gauss--normal--seed0"
    old = {k: v for k, v in rows[0].items() if k != "param_norm_sum"}  # as stored by hbk <= 0.2
    store.save(name, old, store.arrays(name))
    again, _ = E.run_grid(["gauss"], ["normal"], [0], settings, tmp_path, quiet=True)
    assert again[0]["param_norm_sum"] == pytest.approx(want)
    assert again[0]["G"] == rows[0]["G"]  # not re-analysed
    assert E.RunStore(tmp_path).load(name, E.RunStore.key("gauss", "normal", 0, settings))[
        "param_norm_sum"] == pytest.approx(want)
