"""The benchmark harness at smoke sizes (``make bench-smoke``), so it never rots.

One module-scoped run of ``bench/run.py --smoke`` (every task, in subprocesses); the tests
then check its rows: the always-available references (torch.func, torch.autograd, scipy with
a plain HVP) and hbk's own rows must agree with the ground truth; each optional anchor's rows
are checked where it is installed and skipped, naming the package, where not
(``make bench`` installs them). Plus unit tests of the harness's status logic.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _harness as H

TASKS = ["eigen", "exact", "persample", "trace", "pipeline", "scaling"]
ANCHORS = ["pyhessian", "hessian_eigenthings", "curvlinops", "backpack", "opacus"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import run  # bench/run.py

    out = tmp_path_factory.mktemp("bench-smoke")
    rc = run.main(["--smoke", "--out", str(out)])
    rows = {}
    for t in TASKS:
        f = out / "results" / f"{t}.json"
        rows[t] = json.loads(f.read_text())["rows"] if f.exists() else None
    return {"rc": rc, "out": out, "rows": rows}


@pytest.mark.slow
def test_every_task_runs_and_the_report_is_written(smoke):
    assert smoke["rc"] == 0
    missing = [t for t, r in smoke["rows"].items() if not r]
    assert not missing, f"tasks without results: {missing}"
    text = (smoke["out"] / "RESULTS.md").read_text()
    for title in ("SMOKE RUN", "## Environment", "## Headline", "## Reading",
                  "## Top-k Hessian eigenpairs", "## Exact Hessian", "## Per-sample gradient",
                  "## Hessian trace", "## Spectral density", "## The paper pipeline",
                  "## Scaling", "scaling_n.png"):
        assert title in text, title
    for png in ("scaling_n.png", "scaling_p.png", "scaling_k.png"):
        assert (smoke["out"] / "results" / png).stat().st_size > 1000


def _tool_rows(smoke) -> list[dict]:
    return [r for t in TASKS for r in (smoke["rows"][t] or []) if r.get("tool")]


@pytest.mark.slow
def test_reference_rows_agree_with_the_ground_truth(smoke):
    refs = [r for r in _tool_rows(smoke) if r["reference"]]
    assert {r["task"] for r in refs} >= {"eigen", "exact", "persample", "training", "kernels"}
    bad = [(r["task"], r["case"], r["tool"], r["status"]) for r in refs if r["status"] != H.OK]
    assert not bad


@pytest.mark.slow
def test_our_rows_agree_and_have_times(smoke):
    ours = [r for r in _tool_rows(smoke) if r["ours"]]
    tasks = {r["task"] for r in ours}
    assert tasks >= {"eigen", "exact", "persample", "trace", "density", "training", "kernels",
                     "pipeline"}
    bad = [(r["task"], r["case"], r["tool"], r["status"]) for r in ours if r["status"] != H.OK]
    assert not bad
    assert all(r["median_s"] > 0 for r in ours)


@pytest.mark.slow
def test_scaling_points_have_limits(smoke):
    pts = [r for r in smoke["rows"]["scaling"] if r.get("task") == "scaling"]
    assert {p["axis"] for p in pts} == {"n", "p", "k"}
    assert {p["op"] for p in pts} == {"align", "gram", "lanczos"}
    for p in pts:
        assert p["hbk_s"] > 0 and p["limit_s"] > 0 and p["out_mb"] > 0
        assert p.get("agrees", True), p


@pytest.mark.slow
@pytest.mark.parametrize("pkg", ANCHORS)
def test_anchor_rows(smoke, pkg):
    rows = [r for r in _tool_rows(smoke) if r.get("package") == pkg]
    assert rows, f"no benchmark rows use {pkg}"
    if importlib.util.find_spec(pkg) is None:
        assert all(r["status"] == f"not installed ({pkg})" for r in rows)
        pytest.skip(f"{pkg} is not installed (make bench installs it)")
    assert not [r for r in rows if r["status"].startswith("not installed")]
    # An anchor may legitimately fail on a model (unsupported layer, wrong eigenpairs), but a
    # wrapper that never works is a harness bug.
    assert any(r["status"] == H.OK for r in rows), [r["status"] for r in rows]
    assert all(r["status"] for r in rows)


# ----------------------------------------------------------------------------- harness logic
def test_run_tools_statuses():
    def check(ans):
        return abs(ans - 1.0) < 1e-6, abs(ans - 1.0), f"err {abs(ans - 1.0):.1e}"

    def boom():
        raise RuntimeError("first line\nsecond line")

    tools = [H.Tool("ours", lambda: lambda: 1.0, ours=True),
             H.Tool("wrong", lambda: lambda: 2.0),
             H.Tool("raises", lambda: boom),
             H.Tool("missing", lambda: lambda: 1.0, package="no_such_package_hbk"),
             H.Tool("half", lambda: lambda: 1.0, scale=2.0)]
    rows = {r["tool"]: r for r in H.run_tools(tools, check, 3, task="t", case="c")}
    assert rows["ours"]["status"] == H.OK and rows["ours"]["repeats"] == 3
    assert rows["ours"]["ratio"] == 1.0
    assert rows["wrong"]["status"].startswith("FAIL (disagrees: err 1.0e+00")
    assert "median_s" not in rows["wrong"]
    assert rows["raises"]["status"] == "FAIL (error: RuntimeError: first line)"
    assert rows["missing"]["status"] == "not installed (no_such_package_hbk)"
    assert rows["half"]["status"] == H.OK and len(rows["half"]["times"]) == 3
    table = H.tool_table(list(rows.values()))
    assert "FAIL (disagrees" in table and "not installed" in table and "**ours**" in table


def test_interleaved_order():
    calls = []

    def make(name):
        return lambda: lambda: calls.append(name) or 1.0

    H.run_tools([H.Tool("a", make("a"), ours=True), H.Tool("b", make("b"))],
                lambda a: (True, 0.0, ""), 2, task="t", case="c")
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then interleaved rounds


def test_install_anchors_reads_the_bench_extra():
    import install_anchors as ia

    reqs = ia.bench_extra()
    names = {ia._name(r) for r in reqs}
    assert {"pyhessian", "hessian-eigenthings", "curvlinops-for-pytorch",
            "backpack-for-pytorch", "opacus", "scipy"} <= names
    assert ia.NO_DEPS <= names
    assert "torch" not in names
