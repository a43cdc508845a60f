"""docs/reproduction.md generation (hbkernels.boundary.reproduction) on constructed results."""

from __future__ import annotations

import json

import pytest
import torch

from hbkernels.boundary import experiments as E
from hbkernels.boundary import reproduction as R


def _row(dataset, setup, seed, G, trace, lam, norm):
    return {"dataset": dataset, "setup": setup, "seed": seed, "G": G, "G_mean": G / 2,
            "trace": trace, "lambda_max": lam, "param_norm": norm / 2,
            "param_norm_sum": norm, "train_acc": 1.0,
            "test_acc": 0.9, "eps": 0.1, "num_outliers": 3, "collapsed": False,
            "analysis_seconds": 2.0}


def _payload(rows, wall=60.0):
    summary = E.summarize(rows)
    return {"runs": rows, "summary": summary, "checks": E.ordering_checks(rows, summary),
            "wall_seconds": wall, "settings": {"profile": "reference", "rule": "max",
                                               "dtype": "float64"}, "seeds": [0, 1]}


@pytest.fixture
def store(tmp_path):
    # gauss: normal has the lower G in both seeds (agrees with the paper); lower trace too,
    # which disagrees (the paper's normal trace 0.176 > adversarial 0.003).
    rows = [_row("gauss", "normal", 0, 0.05, 0.1, 0.05, 20.0),
            _row("gauss", "normal", 1, 0.07, 0.1, 0.05, 21.0),
            _row("gauss", "adversarial", 0, 0.15, 0.2, 0.1, 100.0),
            _row("gauss", "adversarial", 1, 0.06, 0.3, 0.1, 110.0)]
    (tmp_path / "table1").mkdir()
    (tmp_path / "table1" / "results.json").write_text(json.dumps(_payload(rows)))
    return tmp_path


def test_cells_show_ours_beside_the_paper(store):
    md = R.reproduction_markdown(store)
    line = next(x for x in md.splitlines() if x.startswith("| gauss | normal |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # G ours = mean 0.06 ± std 0.01, paper 0.055, ratio 1.09x
    assert cells[3:6] == ["0.060 ± 0.010", "0.055", "1.09x"]
    assert cells[-3:] == ["20.50 ± 0.50", "19.60", "1.05x"]


def test_orderings_count_seeds_and_compare_with_the_paper(store):
    pl = json.loads((store / "table1" / "results.json").read_text())
    items = {it["metric"]: it for it in R.orderings(pl["checks"], E.PAPER_TABLE1)}
    g = items["G"]
    assert (g["paper_normal_lower"], g["ours_normal_lower"], g["seeds"], g["pairs"]) == (True, True, 1, 2)
    assert g["agrees"] is True
    t = items["trace"]
    assert t["paper_normal_lower"] is False and t["ours_normal_lower"] is True and t["agrees"] is False
    md = R.reproduction_markdown(store)
    assert "gauss, trace(H): the paper has normal higher than adversarial" in md
    assert "for G 1 of 1" in md


def test_differences_name_G_far_from_the_paper(tmp_path):
    rows = [_row("circle", "normal", 0, 0.2, 8.0, 5.0, 22.0)]  # paper G 0.044: 4.5x
    (tmp_path / "table1").mkdir()
    (tmp_path / "table1" / "results.json").write_text(json.dumps(_payload(rows)))
    assert "circle normal: G 0.200 vs the paper's 0.044 (4.55x)" in R.reproduction_markdown(tmp_path)


def test_digits_rows_use_the_mnist_paper_values(tmp_path):
    rows = [_row("digits-017", "normal", 0, 0.04, 6.0, 3.0, 30.0)]
    (tmp_path / "table2").mkdir()
    (tmp_path / "table2" / "results.json").write_text(json.dumps(_payload(rows)))
    md = R.reproduction_markdown(tmp_path)
    line = next(x for x in md.splitlines() if x.startswith("| digits-017 | normal |"))
    assert "0.037" in line and "2.24e+03" in line  # paper mnist-017: G 0.037, norm 2237.6


def test_timings_readings_and_questions_are_included(store, tmp_path):
    R.record_timing(store, "table1 training", 3000.0, 5000.0)
    R.record_timing(store, "table1 training", 3600.0, 6000.0)  # replaced, not duplicated
    docs = tmp_path / "docs"
    (docs / "questions").mkdir(parents=True)
    (docs / "readings.md").write_text("Our reading.\n")
    (docs / "questions" / "alpha.md").write_text("### alpha\n\n![fig](alpha.png) [x](https://a.b)\n")
    (docs / "questions" / "report.md").write_text("ALL QUESTIONS AGAIN\n")
    dest = R.write_reproduction(store, docs / "reproduction.md")
    md = dest.read_text()
    assert "| table1 training | 60.0 min | 100.0 min |" in md
    assert md.count("table1 training") == 1
    assert "Our reading." in md
    assert "![fig](questions/alpha.png)" in md and "(https://a.b)" in md
    assert "ALL QUESTIONS AGAIN" not in md


def test_missing_results_are_named(tmp_path):
    with pytest.raises(ValueError, match="hbk.boundary.reproduction: expected .*table1/results.json"):
        R.reproduction_markdown(tmp_path)


def test_the_cli_writes_the_document(store, tmp_path, capsys):
    from hbkernels import cli

    dest = tmp_path / "docs" / "reproduction.md"
    assert cli.main(["reproduce", "doc", "--out", str(store), "--dest", str(dest)]) == 0
    assert "| gauss | normal |" in dest.read_text()
    assert cli.main(["reproduce", "doc", "--out", str(tmp_path / "none"), "--dest", str(dest)]) == 1
    assert "hbk reproduce table1/table2 first" in capsys.readouterr().err


def test_parameter_norm_sum_is_the_sum_of_the_tensor_norms():
    from torch import nn

    from hbkernels.boundary.measures import parameter_norm, parameter_norm_sum

    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(1.0)  # norm sqrt(6)
        m.bias.copy_(torch.tensor([3.0, 4.0]))  # norm 5
    assert parameter_norm_sum(m) == pytest.approx(6 ** 0.5 + 5)
    assert parameter_norm(m) == pytest.approx((6 + 25) ** 0.5)
