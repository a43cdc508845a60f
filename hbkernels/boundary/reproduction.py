"""``docs/reproduction.md``: the paper's Tables 1 and 2 beside ours, cell by cell.

:func:`reproduction_markdown` reads what ``hbk reproduce table1`` / ``table2`` wrote
(``<out>/table1/results.json``, ``<out>/table2/results.json``), the training wall times
(``<out>/timings.json``, written by :func:`record_timing`), hand-written readings
(``readings.md`` beside the destination, optional) and the open-question sections
(``questions/*.md`` beside the destination, from ``hbk reproduce questions``), and lays them
out as one document:

* every cell of both tables: ours (mean ± std over the seeds) beside the paper's mean, for G,
  trace(H), lambda_max and the parameter norm, with the ratio ours / paper;
* every ordering the paper's table implies (normal against adversarial / large norm, wide
  margin against normal) per metric: the paper's direction, ours by the means, and the
  number of seeds where it holds;
* the wall times of training and analysis.

Nothing here computes a measure: it only reads results, so the document can be regenerated
at any time (``hbk reproduce doc``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checks import fail
from ..fileio import atomic_write_text, read_json

__all__ = ["METRICS", "record_timing", "reproduction_markdown", "write_reproduction"]

# (key in our summary, label, index in the paper's tuple (G, trace, lambda_max, norm))
# The paper's ||theta|| is the sum of the per-tensor norms (measures.parameter_norm_sum): ours
# match it to 1-2 %, while the global L2 norm is half of it.
METRICS = (("G", "G", 0), ("trace", "trace(H)", 1), ("lambda_max", "λ_max", 2),
           ("param_norm_sum", "Σ‖θ_l‖", 3))
_FN = "hbk.boundary.reproduction"


def record_timing(out: str | Path, key: str, wall: float, cpu: float | None = None) -> Path:
    """Add (or replace) one wall-time entry ``key`` in ``<out>/timings.json`` (atomic)."""
    path = Path(out) / "timings.json"
    doc: dict[str, Any] = read_json(_FN, path) if path.exists() else {}
    if not isinstance(doc, dict):
        fail(_FN, f"a JSON object in {path}", type(doc).__name__)
    doc[key] = {"wall_seconds": float(wall), "cpu_seconds": None if cpu is None else float(cpu)}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))
    return path


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1000 or (0 < abs(v) < 10 ** -digits):
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _cell(stat: Mapping | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{_num(stat['mean'], digits)} ± {_num(stat['std'], digits)}"


def _ratio(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None or paper == 0:
        return "n/a"
    return f"{ours / paper:.2f}x"


def _paper_key(dataset: str, paper: Mapping) -> str | None:
    if dataset in paper:
        return dataset
    alt = "mnist-" + dataset.split("-", 1)[1] if dataset.startswith("digits-") else None
    return alt if alt in paper else None


def cells_markdown(summary: Mapping, paper: Mapping) -> str:
    """One row per (dataset, setup): ours beside the paper for every metric of the table."""
    head = ["dataset", "training", "seeds"]
    for _, label, _ in METRICS:
        head += [f"{label} ours", f"{label} paper", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset, per in summary.items():
        pk = _paper_key(dataset, paper)
        for setup, st in per.items():
            pv = paper.get(pk, {}).get(setup) if pk else None
            row = [dataset, setup + (f" ({st['collapsed']} collapsed)" if st.get("collapsed") else ""),
                   str(len(st.get("seeds", [])))]
            for key, _, i in METRICS:
                digits = 2 if key.startswith("param_norm") else 3
                ours = st.get(key) or {}
                row += [_cell(ours, digits), _num(pv[i], digits) if pv else "n/a",
                        _ratio(ours.get("mean"), pv[i] if pv else None)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def orderings(checks: Mapping, paper: Mapping) -> list[dict]:
    """Every pairwise ordering of the paper's table (normal vs each other setup), per metric.

    Args:
        checks: the ``checks`` of a ``results.json`` (:func:`~hbkernels.boundary.experiments.
            ordering_checks`: per dataset and other setup, per metric, the means, whether the
            normal one is lower and in how many seeds).
        paper: the paper's table (``PAPER_TABLE1`` / ``PAPER_TABLE2``).

    Returns:
        One dict per (dataset, other setup, metric): ``paper_normal_lower`` (None without a
        paper value), ``ours_normal_lower`` (by the means), ``seeds`` (seeds where the normal
        run is lower than the other run of the same seed) of ``pairs``, and ``agrees``.
    """
    out = []
    for dataset, per in checks.items():
        pk = _paper_key(dataset, paper)
        pp = paper.get(pk, {}) if pk else {}
        for other, c in per.items():
            for key, label, i in METRICS:
                mc = c.get(key) or {}  # a results.json older than the metric has none
                p_lower = (pp["normal"][i] < pp[other][i]) if "normal" in pp and other in pp else None
                o_lower = mc.get("normal_lower")
                out.append({"dataset": dataset, "other": other, "metric": key, "label": label,
                            "paper_normal_lower": p_lower, "ours_normal_lower": o_lower,
                            "seeds": mc.get("seeds_normal_lower", 0), "pairs": mc.get("pairs", 0),
                            "agrees": None if p_lower is None or o_lower is None
                            else p_lower == o_lower})
    return out


def orderings_markdown(items: list[dict]) -> str:
    def rel(lower: bool | None, other: str) -> str:
        return "n/a" if lower is None else (f"normal < {other}" if lower else f"normal > {other}")

    lines = ["| dataset | metric | paper | ours (means) | seeds with normal lower | agrees |",
             "|---|---|---|---|---|---|"]
    for it in items:
        mark = {True: "✓", False: "✗", None: "n/a"}[it["agrees"]]
        lines.append(f"| {it['dataset']} | {it['label']} | {rel(it['paper_normal_lower'], it['other'])} "
                     f"| {rel(it['ours_normal_lower'], it['other'])} | {it['seeds']}/{it['pairs']} "
                     f"| {mark} |")
    agreed = [it for it in items if it["agrees"] is not None]
    ok = sum(it["agrees"] for it in agreed)
    g = [it for it in agreed if it["metric"] == "G"]
    lines.append(f"\n{ok} of {len(agreed)} orderings agree with the paper's table; for G "
                 f"{sum(it['agrees'] for it in g)} of {len(g)}.\n")
    return "\n".join(lines) + "\n"


def differences_markdown(items: list[dict], summary: Mapping, paper: Mapping) -> str:
    """A sentence for every ordering that differs from the paper and every G off by > 2x."""
    out = []
    for it in items:
        if it["agrees"] is False:
            out.append(f"* {it['dataset']}, {it['label']}: the paper has "
                       f"{'normal lower' if it['paper_normal_lower'] else 'normal higher'} than "
                       f"{it['other']}, ours the reverse by the means "
                       f"({it['seeds']}/{it['pairs']} seeds with normal lower).")
    for dataset, per in summary.items():
        pk = _paper_key(dataset, paper)
        for setup, st in per.items():
            pv = paper.get(pk, {}).get(setup) if pk else None
            g = (st.get("G") or {}).get("mean")
            if pv and g is not None and pv[0] and not 0.5 <= g / pv[0] <= 2:
                out.append(f"* {dataset} {setup}: G {g:.3f} vs the paper's {pv[0]:.3f} "
                           f"({g / pv[0]:.2f}x).")
    return ("\n".join(out) if out else "No ordering differs from the paper's table.") + "\n"


def _timing_md(out: Path, payloads: Mapping[str, dict]) -> str:
    path = out / "timings.json"
    tim = read_json(_FN, path) if path.exists() else {}
    lines = ["| part | wall time | CPU time |", "|---|---|---|"]
    for key, v in sorted(tim.items()):
        cpu = v.get("cpu_seconds")
        lines.append(f"| {key} | {v['wall_seconds'] / 60:.1f} min | "
                     f"{'n/a' if cpu is None else f'{cpu / 60:.1f} min'} |")
    for name, pl in payloads.items():
        runs = pl.get("runs", [])
        ana = sum(r.get("analysis_seconds") or 0 for r in runs)
        lines.append(f"| {name}: the last `hbk reproduce` call ({len(runs)} runs; those already in "
                     f"the store are loaded, not recomputed) | {pl.get('wall_seconds', 0) / 60:.1f} "
                     f"min | sum of the per-run analysis times: {ana / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def reproduction_markdown(out: str | Path, dest_dir: str | Path | None = None) -> str:
    """The document, from the results under ``out`` (see the module docstring)."""
    from .experiments import PAPER_TABLE1, PAPER_TABLE2

    out = Path(out)
    dest_dir = Path(dest_dir) if dest_dir is not None else None
    payloads = {}
    for name in ("table1", "table2"):
        path = out / name / "results.json"
        if path.exists():
            payloads[name] = read_json(_FN, path)
    if not payloads:
        fail(_FN, f"{out}/table1/results.json or {out}/table2/results.json (run hbk reproduce "
                  "table1/table2 first)", "neither file", raw=True)
    md = ["# Reproducing the paper at its own scale\n",
          ("Generated by `hbk reproduce doc` from the runs of `hbk reproduce table1 --profile "
          "reference --seeds 5` and `hbk reproduce table2 --profile reference --seeds 5` "
          f"(store `{out}`). Ours: mean ± std over the seeds; paper: the mean of its 5 runs. "
          "G uses the reference code's max rule over the training points above round-off "
           "(analyze's round-off rule; the reference code counts every point, see the readings); "
           "the Hessian is exact (float64).\n"),
          "## Wall times\n", _timing_md(out, payloads)]
    titles = {"table1": "Table 1: the 2-D datasets", "table2": "Table 2: Iris and the digit "
              "subsets (8x8 scikit-learn digits stand in for the MNIST subsets: offline)"}
    for name, pl in payloads.items():
        paper = PAPER_TABLE1 if name == "table1" else PAPER_TABLE2
        items = orderings(pl["checks"], paper)
        st = pl.get("settings", {})
        md += [f"## {titles[name]}\n",
               (f"Profile **{st.get('profile', '?')}**, seeds {pl.get('seeds')}, rule "
               f"**{st.get('rule', '?')}**, {st.get('dtype', '?')} Hessian; per-run rows in "
               f"`{out / name / 'report.md'}`.\n"),
               "### Every cell\n", cells_markdown(pl["summary"], paper),
               "### Every ordering\n", orderings_markdown(items),
               "### Differences from the paper\n", differences_markdown(items, pl["summary"], paper)]
        margin = _margin_md(pl.get("checks", {}))
        if margin:
            md += ["### Margins (checkerboard)\n", margin]
    if dest_dir is not None:
        readings = dest_dir / "readings.md"
        if readings.exists():
            md += ["## Reading the differences\n", readings.read_text()]
        qdir = dest_dir / "questions"
        if qdir.is_dir():
            md.append("## The open questions\n")
            for q in sorted(qdir.glob("*.md")):
                if q.name != "report.md":  # hbk reproduce questions' own page of all of them
                    md.append(_rebase(q))
    return "\n".join(md)


def _rebase(path: Path) -> str:
    """A question's markdown with its relative links made relative to the document's folder."""
    return re.sub(r"\]\((?!https?:|/|#)(?:\./)?", f"]({path.parent.name}/", path.read_text())


def _margin_md(checks: Mapping) -> str:
    lines = []
    for dataset, dc in checks.items():
        for other, c in dc.items():
            for key, what in (("margin", "estimated (Hessian method)"),
                              ("grid_margin", "geometric (400 x 400 grid)")):
                mc = c.get(key)
                if mc and mc.get("wide_larger") is not None:
                    lines.append(f"* {dataset}, {what}: normal {mc['normal']:.3f} vs {other} "
                                 f"{mc[other]:.3f}; wide margin larger in "
                                 f"{mc['seeds_wide_larger']}/{mc['pairs']} seeds")
    return "\n".join(lines) + ("\n" if lines else "")


def write_reproduction(out: str | Path, dest: str | Path = "docs/reproduction.md") -> Path:
    """Write :func:`reproduction_markdown` to ``dest`` (atomic)."""
    dest = Path(dest)
    text = reproduction_markdown(out, dest.parent)
    atomic_write_text(dest, text)
    return dest
