"""The paper's experiments: the demo, Tables 1 and 2 and the figures (resumable).

Every experiment is a grid of runs ``(dataset, setup, seed)``. A run trains (through
:func:`~hbkernels.boundary.training.train_setups`, whose model cache lives in ``out/models``),
then analyses the model (:func:`~hbkernels.boundary.measures.analyze`: exact float64 spectrum,
eps, G, trace, lambda_max, norm, outliers) and writes ``out/runs/<dataset>--<setup>--seed<s>.json``
plus ``.pt`` arrays (eigenvalues, top eigenvectors, training alignments). A rerun with the same
settings skips finished runs, so an interrupted ``hbk reproduce`` resumes where it stopped.

Compute profiles (see ``demo_budget.md``):

* ``"budget"`` (default): for the 2-D datasets width 50, normal 2,000 epochs, random-label
  ``min(reference, 40,000)``, adversarial fine-tune 2,000, large norm 1,000, SGD lr 0.02
  batch 64, float64 Hessian: the schedule measured to reproduce the Table 1 ordering on 2
  cores. Iris and the digit subsets keep their reference networks and epochs (cheap enough).
* ``"reference"``: the reference width (100 for 2-D data) and the reference epochs (random
  labels 300k for gauss, ...). Hours on 2 cores; the dense float64 eigh of p = 10,703 takes
  minutes per model.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_bool, check_choice, check_float, check_int, fail
from ..fileio import (
    CorruptFileError,
    DamagedFileWarning,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    load_torch,
    read_json,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
    store_lock,
)
from . import appendix as A
from . import measures as M
from . import plots as P
from .datasets import Dataset, check_dataset_name, load_dataset
from .margin import estimate_margin
from .training import TrainResult, reference_config, train_setups

__all__ = [
    "DEMO_SETTINGS",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "TABLE1_DATASETS",
    "TABLE2_DATASETS",
    "RunStore",
    "Settings",
    "demo",
    "figures",
    "ordering_checks",
    "phase_epochs",
    "run_grid",
    "summarize",
    "table1",
    "table2",
]

TABLE1_DATASETS = ("gauss", "circle", "half-moon", "hierarchical", "checkerboard-linear")
TABLE1_SETUPS = ("normal", "adversarial", "large-norm")
TABLE2_DATASETS = ("iris", "digits-017", "digits-179", "digits-0179", "digits-1379")
TABLE2_SETUPS = ("normal", "adversarial")
PHASES = ("normal", "random-label", "adversarial", "large-norm", "wide-margin")

# Paper Table 1 / Table 2: (G, trace, lambda_max, ||theta||) means over 5 runs.
PAPER_TABLE1 = {
    "gauss": {"normal": (0.055, 0.176, 0.114, 19.60), "adversarial": (0.156, 0.003, 0.002, 105.0),
              "large-norm": (0.114, 0.021, 0.017, 98.169)},
    "circle": {"normal": (0.044, 8.028, 4.965, 22.884), "adversarial": (0.059, 0.795, 0.439, 41.630),
               "large-norm": (0.057, 6.320, 4.350, 41.840)},
    "half-moon": {"normal": (0.036, 4.202, 2.958, 21.529),
                  "adversarial": (0.072, 0.037, 0.017, 68.988),
                  "large-norm": (0.042, 1.119, 0.868, 64.807)},
    "hierarchical": {"normal": (0.053, 12.450, 7.102, 20.034),
                     "adversarial": (0.118, 3.394, 2.645, 121.675),
                     "large-norm": (0.059, 93.104, 36.787, 112.579)},
    "checkerboard-linear": {"normal": (0.046, 0.240, 0.127, 19.267),
                            "wide-margin": (0.043, 0.029, 0.014, 19.910)},
}
PAPER_TABLE2 = {
    "iris": {"normal": (0.031, 67.857, 65.005, 13.998), "adversarial": (0.094, 8.324, 5.934, 68.361)},
    "mnist-017": {"normal": (0.037, 6.288, 3.758, 2237.6), "adversarial": (0.109, 0.945, 0.479, 938.38)},
    "mnist-179": {"normal": (0.045, 14.714, 8.270, 731.65), "adversarial": (0.209, 5.222, 1.611, 268.65)},
    "mnist-0179": {"normal": (0.043, 28.472, 13.254, 387.54),
                   "adversarial": (0.110, 3.180, 0.946, 209.41)},
    "mnist-1379": {"normal": (0.077, 18.380, 6.868, 249.63),
                   "adversarial": (0.135, 2.938, 0.844, 398.19)},
}
_RUN_VERSION = 1
_STORE_FORMAT = "hbk-run-2"
_BUDGET_CAPPED = TABLE1_DATASETS + ("checkerboard-noisy", "hierarchical-2")
_KEEP = 25  # top eigenvectors / training alignments stored per run


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Settings of an experiment (all part of a run's resume key except the bookkeeping).

    Attributes:
        profile: ``"budget"`` or ``"reference"`` (default epochs and width).
        width: hidden width of the 2-D / Iris networks (None: the profile's).
        epochs: per-phase epoch overrides (keys from ``PHASES``).
        epochs_scale: multiplies every phase's epochs (>= 1 epoch each); for quick runs.
        rule: ``"max"`` or ``"mean"`` (the reported G).
        max_exact_params: dense spectrum up to this p (else top-k Lanczos, G lower bound).
        num_directions, eps_seed: the threshold's random directions.
        resolution: grid points per axis of the alignment maps.
        k_maps: eigenvectors per alignment-map row.
        margin_steps, margin_restarts: the margin search (reference 20,000 steps).
        dtype: analysis dtype name (float64).
    """

    profile: str = "budget"
    width: int | None = None
    epochs: dict[str, int] = field(default_factory=dict)
    epochs_scale: float = 1.0
    rule: str = "max"
    max_exact_params: int = 6000
    num_directions: int = 5
    eps_seed: int = 42
    resolution: int = 100
    k_maps: int = 5
    margin_steps: int = 5000
    margin_restarts: int = 8
    dtype: str = "float64"

    def __post_init__(self) -> None:
        fn = "hbk.boundary.Settings"
        check_choice(fn, "profile", self.profile, ("budget", "reference"))
        check_choice(fn, "rule", self.rule, tuple(M.RULES))
        if self.width is not None:
            check_int(fn, "width", self.width, 1)
        if not isinstance(self.epochs, dict):
            fail(fn, "epochs to be a dict {phase: epochs}", self.epochs, TypeError)
        bad = set(self.epochs) - set(PHASES)
        if bad:
            raise ValueError(f"{fn}: expected epochs keys in {PHASES}, got {sorted(bad)}")
        for k, v in self.epochs.items():
            check_int(fn, f"epochs[{k!r}]", v, 0)
        check_float(fn, "epochs_scale", self.epochs_scale, 0, lo_open=True)
        check_int(fn, "max_exact_params", self.max_exact_params, 1)
        check_int(fn, "num_directions", self.num_directions, 1)
        check_int(fn, "eps_seed", self.eps_seed, 0)
        check_int(fn, "resolution", self.resolution, 2)
        check_int(fn, "k_maps", self.k_maps, 1)
        check_int(fn, "margin_steps", self.margin_steps, 1)
        check_int(fn, "margin_restarts", self.margin_restarts, 1)
        check_choice(fn, "dtype", self.dtype, ("float32", "float64"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def width_for(self, dataset: str) -> int | None:
        """Hidden width for the dataset's network (None: fixed architecture or reference)."""
        family = dataset.split("-")[0]
        if family in ("digits", "mnist", "cifar", "intro"):
            return None
        if self.width is not None:
            return self.width
        return 50 if self.profile == "budget" else None

    def to_dict(self) -> dict:
        return asdict(self)


DEMO_SETTINGS = Settings()


def phase_epochs(dataset: str, settings: Settings) -> dict[str, int]:
    """Epochs of every training phase for a dataset under the settings.

    budget, for the 2-D synthetic datasets (where the reference's 300k-epoch random-label runs
    are the cost): normal = the reference (2,000), random-label = min(reference, 40,000),
    adversarial = min(reference, 2,000), large norm = min(reference, 1,000). Every other
    dataset (Iris: full-batch 200k random-label epochs take about a minute; the digit subsets)
    and the reference profile: the reference epochs. Then the explicit overrides, then
    ``epochs_scale``.
    """
    out = {}
    capped = settings.profile == "budget" and dataset in _BUDGET_CAPPED
    for ph in ("normal", "random-label", "adversarial", "large-norm"):
        ref = reference_config(dataset, ph).epochs
        if capped:
            cap = {"normal": ref, "random-label": 40_000, "adversarial": 2000, "large-norm": 1000}[ph]
            ref = min(ref, cap)
        out[ph] = ref
    out.update({k: int(v) for k, v in settings.epochs.items()})
    if settings.epochs_scale != 1.0:
        out = {k: max(1, int(round(v * settings.epochs_scale))) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- run store
def run_name(dataset: str, setup: str, seed: int) -> str:
    return f"{dataset}--{setup}--seed{seed}"


class RunStore:
    """Per-run results on disk, verified on load.

    Each run is ``runs/<name>.json`` (the row), ``runs/<name>.pt`` (the arrays) and, written
    last, ``runs/<name>.manifest.json`` with the settings key and the sha256 of both files.
    A run without a manifest is absent (an interrupted save); a run whose files do not match
    their manifest (edited, truncated, another run's file) is reported by path
    (:class:`~hbkernels.fileio.DamagedFileWarning`) and recomputed. Every file is written
    atomically, and writers (and readers) of one store take ``runs/.lock``, so concurrent
    processes never see each other's half-replaced runs.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dir = self.out / "runs"
        check_writable("hbk.boundary.RunStore", self.dir)
        remove_stale_temporaries(self.dir)  # left by a killed writer

    @staticmethod
    def key(dataset: str, setup: str, seed: int, settings: Settings) -> dict:
        s = settings.to_dict()
        for k in ("resolution", "k_maps", "margin_steps", "margin_restarts", "epochs",
                  "epochs_scale", "profile", "width"):
            s.pop(k)
        return {"version": _RUN_VERSION, "dataset": dataset, "setup": setup, "seed": seed,
                "width": settings.width_for(dataset), "epochs": phase_epochs(dataset, settings),
                "analysis": s}

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        """``(row .json, arrays .pt, manifest)`` of a run."""
        return (self.dir / f"{name}.json", self.dir / f"{name}.pt",
                self.dir / f"{name}.manifest.json")

    def _verified(self, name: str, key: dict | None) -> dict | None:
        """The manifest if the run is complete and intact (raises CorruptFileError if not);
        None if absent or made with other settings than ``key``."""
        fn = "hbk.boundary.RunStore"
        row_path, arr_path, man_path = self.paths(name)
        if not man_path.exists():
            return None
        man = read_json(fn, man_path)
        if not (isinstance(man, dict) and man.get("format") == _STORE_FORMAT
                and isinstance(man.get("files"), dict) and "key" in man):
            raise CorruptFileError(f"{fn}: expected a run manifest, got a damaged {man_path}",
                                   man_path)
        if key is not None and man["key"] != _canonical(key):
            return None
        for path in (row_path, arr_path):
            digest = man["files"].get(path.name)
            if not path.is_file():
                raise CorruptFileError(f"{fn}: expected {path} (listed in {man_path}), got no "
                                       "file", path)
            if digest is None or sha256_file(path) != digest:
                raise CorruptFileError(f"{fn}: expected {path} to match its sha256 in "
                                       f"{man_path}, got different content (edited, truncated "
                                       "or another run's file)", path)
        return man

    def load(self, name: str, key: dict) -> dict | None:
        """The stored row of a run made with ``key``, or None (absent, other settings, or
        damaged: then a warning names the file and the run is recomputed)."""
        with store_lock(self.dir, shared=True):
            try:
                man = self._verified(name, key)
                if man is None:
                    return None
                row = read_json("hbk.boundary.RunStore", self.paths(name)[0])
                if not isinstance(row, dict) or row.get("key") != man["key"]:
                    raise CorruptFileError(f"hbk.boundary.RunStore: expected the row of "
                                           f"{name} in {self.paths(name)[0]}, got another",
                                           self.paths(name)[0])
                return row
            except CorruptFileError as err:
                warnings.warn(f"hbk: run {name} is damaged and is recomputed: {err}",
                              DamagedFileWarning, stacklevel=2)
                return None

    def save(self, name: str, row: dict, arrays: dict) -> None:
        """Write a run: arrays, row, then the manifest (all atomic, under the store lock)."""
        row_path, arr_path, man_path = self.paths(name)
        buf = io.BytesIO()
        torch.save(arrays, buf)
        blob = buf.getvalue()
        doc = M.to_jsonable(row)
        text = json.dumps(doc, indent=1).encode("utf-8")
        manifest = {"format": _STORE_FORMAT, "name": name, "key": doc.get("key"),
                    "key_sha256": sha256_bytes(json.dumps(doc.get("key"), sort_keys=True)
                                               .encode()),
                    "files": {arr_path.name: sha256_bytes(blob),
                              row_path.name: sha256_bytes(text)}}
        with store_lock(self.dir):
            with contextlib.suppress(FileNotFoundError):
                man_path.unlink()  # the run is absent until its new manifest is written
            atomic_write_bytes(arr_path, blob)
            atomic_write_bytes(row_path, text)
            atomic_write_text(man_path, json.dumps(manifest, indent=1))

    def arrays(self, name: str) -> dict:
        """The arrays of a stored run, verified against its manifest.

        Raises:
            CorruptFileError: the run is missing, incomplete or damaged (named).
        """
        fn = "hbk.boundary.RunStore.arrays"
        with store_lock(self.dir, shared=True):
            if self._verified(name, None) is None:
                raise CorruptFileError(f"{fn}: expected a complete run {name} in {self.dir}, "
                                       f"got no manifest {self.paths(name)[2]}",
                                       self.paths(name)[2])
            return load_torch(fn, self.paths(name)[1], what="run arrays")


def _canonical(key: dict) -> Any:
    return json.loads(json.dumps(M.to_jsonable(key)))


# ----------------------------------------------------------------------------- one run
def _train(dataset: str, setup: str, seeds: Sequence[int], settings: Settings, out: Path,
           quiet: bool) -> list[TrainResult]:
    return train_setups(setup, dataset, list(seeds), width=settings.width_for(dataset),
                        epochs=phase_epochs(dataset, settings), cache_dir=out / "models",
                        quiet=quiet)


def analyze_result(res: TrainResult, ds: Dataset, settings: Settings, *, quiet: bool = True
                   ) -> tuple[dict, dict, M.Analysis]:
    """Analyse one trained model: the row of the results table and the arrays kept on disk."""
    an = M.analyze(res.model, ds.train_data(), rule=settings.rule,
                   num_directions=settings.num_directions, eps_seed=settings.eps_seed,
                   max_exact_params=settings.max_exact_params, keep=_KEEP,
                   dtype=settings.torch_dtype, quiet=quiet)
    d = an.to_dict()
    row = {
        "G": d["G"], "G_rule": d["G_rule"],
        "G_max": d["G_max"]["G"] if d["G_max"] else None,
        "G_mean": d["G_mean"]["G"] if d["G_mean"] else None,
        "G_lower_bound": d["G_lower_bound"], "eps": d["eps"], "trace": d["trace"],
        "lambda_max": d["lambda_max"], "param_norm": d["param_norm"],
        "param_norm_sum": M.parameter_norm_sum(res.model),
        "train_acc": res.train_acc, "test_acc": res.test_acc, "train_loss": res.train_loss,
        "num_outliers": d["num_outliers"], "collapsed": d["collapsed"],
        "collapse_reason": d["collapse_reason"], "num_params": d["num_params"],
        "exact": d["exact"], "top_eigenvalues": d["top_eigenvalues"][:10],
        "zero_grad_fraction": d["zero_grad_fraction"],
        "train_seconds": res.seconds, "analysis_seconds": d["seconds"].get("total"),
    }
    # clone: a view would make torch.save write the whole (p, p) eigenvector storage
    arrays = {"eigenvalues": an.spectrum.eigenvalues.cpu().clone(),
              "top_vectors": an.spectrum.top(_KEEP).cpu().clone(),
              "alignments": an.alignments.cpu().clone(), "labels": ds.y_train.cpu().clone()}
    return row, arrays, an


def _model64(model: nn.Module, settings: Settings) -> nn.Module:
    return M.as_dtype_model(model, settings.torch_dtype)


def run_grid(
    datasets: Sequence[str],
    setups: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    out: str | Path,
    *,
    margins: bool = False,
    quiet: bool = False,
) -> tuple[list[dict], dict[str, TrainResult]]:
    """Train and analyse every ``(dataset, setup, seed)``, skipping finished runs.

    ``wide-margin`` is run only for ``checkerboard-linear``. With ``margins=True`` the
    checkerboard normal and wide-margin runs also get a margin estimate.

    Returns:
        The rows (one per run, in grid order) and the trained results by run name (only the
        runs trained or loaded in this call).
    """
    check_bool("hbk.boundary.run_grid", "margins", margins)
    check_bool("hbk.boundary.run_grid", "quiet", quiet)
    out = Path(out)
    datasets, setups, seeds = _check_grid("hbk.boundary.run_grid", datasets, setups, seeds,
                                          settings)
    store = RunStore(out)
    check_writable("hbk.boundary.run_grid", out / "models")
    jobs = [(d, s) for d in datasets for s in setups
            if s != "wide-margin" or d == "checkerboard-linear"]
    rows: dict[str, dict] = {}
    models: dict[str, TrainResult] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs) * len(seeds), desc="runs", disable=quiet, unit="run")
    for dataset, setup in jobs:
        names = {s: run_name(dataset, setup, s) for s in seeds}
        keys = {s: RunStore.key(dataset, setup, s, settings) for s in seeds}
        want_margin = margins and dataset == "checkerboard-linear" and setup in ("normal", "wide-margin")
        todo = []
        upgrade = []
        for s in seeds:
            hit = store.load(names[s], keys[s])
            if hit is not None and (not want_margin or hit.get("margin") is not None):
                rows[names[s]] = hit
                if ((want_margin and hit.get("grid_margin") is None)
                        or hit.get("param_norm_sum") is None):
                    upgrade.append(s)  # an older run: fill in from its cached model
                bar.update(1)
            else:
                todo.append(s)
        if upgrade:
            ds = load_dataset(dataset)
            for s, res in zip(upgrade, _train(dataset, setup, upgrade, settings, out, quiet=True)):
                row = rows[names[s]]
                if want_margin and row.get("grid_margin") is None:
                    row["grid_margin"] = _grid_margin(res.model, ds)
                if row.get("param_norm_sum") is None:
                    row["param_norm_sum"] = M.parameter_norm_sum(res.model)
                store.save(names[s], row, store.arrays(names[s]))
        if not todo:
            continue
        bar.set_postfix_str(f"{dataset} {setup} training")
        results = _train(dataset, setup, todo, settings, out, quiet=True)
        ds = load_dataset(dataset)
        for s, res in zip(todo, results):
            bar.set_postfix_str(f"{dataset} {setup} seed {s} analysis")
            row, arrays, an = analyze_result(res, ds, settings)
            row = {"setup": setup, "dataset": dataset, "seed": s, **row,
                   "width": settings.width_for(dataset),
                   "epochs": phase_epochs(dataset, settings), "key": keys[s]}
            if want_margin:
                mr = estimate_margin(_model64(res.model, settings), ds.train_data(),
                                     an.spectrum.top(1)[:, 0], restarts=settings.margin_restarts,
                                     steps=settings.margin_steps, seed=s)
                row["margin"] = mr.margin
                row["margin_detail"] = mr.to_dict()
                row["grid_margin"] = _grid_margin(res.model, ds)
                arrays["margin_x_restarts"] = mr.x_restarts
            store.save(names[s], row, arrays)
            rows[names[s]] = json.loads(json.dumps(M.to_jsonable(row)))
            models[names[s]] = res
            bar.update(1)
    bar.close()
    order = [run_name(d, s, sd) for d, s in jobs for sd in seeds]
    return [rows[n] for n in order], models


def _check_grid(fn: str, datasets: Sequence[str], setups: Sequence[str], seeds: Sequence[int],
                settings: Settings) -> tuple[list[str], list[str], list[int]]:
    """Names, setups and seeds checked, and every dataset loaded once (missing MNIST / CIFAR
    files are named) before any training starts."""
    if not isinstance(settings, Settings):
        fail(fn, "settings to be a Settings", settings, TypeError)
    for what, seq in (("datasets", datasets), ("setups", setups), ("seeds", seeds)):
        if isinstance(seq, (str, int)) or not isinstance(seq, Sequence) or not seq:
            fail(fn, f"{what} to be a non-empty list", seq, TypeError if not isinstance(
                seq, Sequence) or isinstance(seq, str) else ValueError)
    datasets = [check_dataset_name(fn, d) for d in datasets]
    setups = [check_choice(fn, "setup", s, PHASES) for s in setups]
    seeds = [check_int(fn, "seed", s, 0) for s in seeds]
    if len(set(seeds)) != len(seeds):
        fail(fn, "distinct seeds", list(seeds), raw=True)
    for d in datasets:
        load_dataset(d)
    return datasets, setups, seeds


def _check_names(fn: str, datasets: Sequence[str], allowed: Sequence[str]) -> None:
    if isinstance(datasets, str) or not isinstance(datasets, Sequence) or not datasets:
        fail(fn, "datasets to be a non-empty list of names", datasets, TypeError)
    bad = [d for d in datasets if d not in allowed]
    if bad:
        fail(fn, f"datasets from {tuple(allowed)}", bad, raw=True)


def _grid_margin(model: nn.Module, ds: Dataset) -> float:
    """The geometric margin of the training set on a 400 x 400 grid (2-D ground truth)."""
    return M.boundary_distance(model, ds.X_train, ds.extent, 400).margin


# ----------------------------------------------------------------------------- summaries
_METRICS = ("G", "G_mean", "trace", "lambda_max", "param_norm", "param_norm_sum", "train_acc",
            "test_acc", "eps", "num_outliers", "margin", "grid_margin")


def _stats(vals: list) -> dict:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}


def summarize(rows: Sequence[dict]) -> dict:
    """Mean and std over seeds of every metric, per ``dataset -> setup``."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["dataset"], {}).setdefault(r["setup"], []).append(r)
    return {d: {s: {"seeds": [r["seed"] for r in rs],
                    "collapsed": sum(bool(r.get("collapsed")) for r in rs),
                    **{m: _stats([r.get(m) for r in rs]) for m in _METRICS}}
                for s, rs in per.items()} for d, per in out.items()}


def ordering_checks(rows: Sequence[dict], summary: dict) -> dict:
    """Does each metric rank the normal minimum as the best (lowest), as the paper claims for G?

    Per dataset and competitor setup: the comparison of means (``normal < other``) and the
    number of seeds where the normal run's value is lower than the competitor run of the same
    seed. For the checkerboard: the wide-margin margin against the normal one (higher is
    wider).
    """
    by = {(r["dataset"], r["setup"], r["seed"]): r for r in rows}
    checks: dict[str, Any] = {}
    # G: "paper_order_holds" is True when the better-generalising minimum (normal; wide-margin
    # on the checkerboard) has the lower mean G.
    for dataset, per in summary.items():
        if "normal" not in per:
            continue
        dc: dict[str, Any] = {}
        for other in per:
            if other == "normal":
                continue
            c: dict[str, Any] = {}
            for m in ("G", "G_mean", "trace", "lambda_max", "param_norm", "param_norm_sum"):
                a, b = per["normal"][m]["mean"], per[other][m]["mean"]
                pairs = [(by[(dataset, "normal", s)].get(m), by[(dataset, other, s)].get(m))
                         for s in per["normal"]["seeds"] if (dataset, other, s) in by]
                pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                c[m] = {"normal": a, other: b,
                        "normal_lower": None if a is None or b is None else bool(a < b),
                        "seeds_normal_lower": sum(x < y for x, y in pairs), "pairs": len(pairs)}
            # the paper's claim: the better-generalising minimum has the lower G; that is the
            # normal one against adversarial / large norm, the wide-margin one on the checkerboard
            nl = c["G"]["normal_lower"]
            c["G"]["paper_order_holds"] = None if nl is None else (nl != (other == "wide-margin"))
            if dataset == "checkerboard-linear" and other == "wide-margin":
                for key in ("margin", "grid_margin"):  # Hessian estimate, true 2-D margin
                    a, b = per["normal"][key]["mean"], per[other][key]["mean"]
                    pairs = [(by[(dataset, "normal", s)].get(key), by[(dataset, other, s)].get(key))
                             for s in per["normal"]["seeds"] if (dataset, other, s) in by]
                    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
                    c[key] = {"normal": a, other: b,
                              "wide_larger": None if a is None or b is None else bool(b > a),
                              "seeds_wide_larger": sum(y > x for x, y in pairs),
                              "pairs": len(pairs)}
            dc[other] = c
        checks[dataset] = dc
    return checks


# ----------------------------------------------------------------------------- report
def _fmt(stat: dict, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    m, s = stat["mean"], stat["std"]
    if abs(m) >= 1000 or (0 < abs(m) < 10 ** -digits):
        return f"{m:.2e} ± {s:.1e}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _table_md(summary: dict, checks: dict, paper: dict | None) -> str:
    head = ("| dataset | training | G ↓ | G_mean (Eq. 6) | trace(H) ↓ | λ_max ↓ | ‖θ‖ ↓ | train acc "
            "| test acc | outliers | margin (est.) | margin (grid) | paper G |\n|" + "---|" * 13 + "\n")
    lines = []
    for dataset, per in summary.items():
        for setup, st in per.items():
            mark = ""
            chk = checks.get(dataset, {}).get(setup, {}).get("G")
            if chk and chk["paper_order_holds"] is not None:
                mark = " ✓" if chk["paper_order_holds"] else " ✗"
            pg = (paper or {}).get(dataset, {}).get(setup)
            coll = f" ({st['collapsed']} collapsed)" if st["collapsed"] else ""
            lines.append(
                f"| {dataset} | {setup}{coll} | {_fmt(st['G'])}{mark} | {_fmt(st['G_mean'], 4)} "
                f"| {_fmt(st['trace'])} | {_fmt(st['lambda_max'])} | {_fmt(st['param_norm'], 2)} "
                f"| {_fmt(st['train_acc'])} | {_fmt(st['test_acc'])} "
                f"| {_fmt(st['num_outliers'], 1)} | {_fmt(st['margin'])} | {_fmt(st['grid_margin'])} "
                f"| {pg[0] if pg else ''} |")
    return head + "\n".join(lines) + "\n"


def _checks_md(checks: dict) -> str:
    out = []
    for dataset, dc in checks.items():
        for other, c in dc.items():
            g = c["G"]
            if g["normal_lower"] is None:
                out.append(f"* {dataset}: G normal vs {other}: not comparable (collapsed or missing)")
                continue
            flat = ", ".join(f"{m} {'normal lower' if c[m]['normal_lower'] else 'normal higher'}"
                             for m in ("trace", "lambda_max", "param_norm")
                             if c[m]["normal_lower"] is not None)
            want = "normal > wide-margin" if other == "wide-margin" else "normal < " + other
            rel = "normal < " + other if g["normal_lower"] else "normal > " + other
            out.append(f"* {dataset}: G normal {g['normal']:.4f} vs {other} {g[other]:.4f}: {rel} "
                       f"(seeds with normal lower: {g['seeds_normal_lower']}/{g['pairs']}); the "
                       f"paper's order ({want}) {'holds' if g['paper_order_holds'] else 'FAILS'}; "
                       f"{flat}")
            for key, what in (("margin", "estimated margin (Hessian method)"),
                              ("grid_margin", "geometric margin (400 x 400 grid, ground truth)")):
                mc = c.get(key)
                if mc and mc["wide_larger"] is not None:
                    out.append(f"* {dataset}: {what}: normal {mc['normal']:.3f} vs wide-margin "
                               f"{mc[other]:.3f}: {'wide-margin larger' if mc['wide_larger'] else 'wide-margin NOT larger'} "
                               f"(seeds {mc['seeds_wide_larger']}/{mc['pairs']})")
    return "\n".join(out) + "\n"


def _env() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}


def write_report(out: Path, title: str, intro: str, rows: list[dict], figures: list[tuple[str, str]],
                 extra: dict, wall: float, paper: dict | None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``results.json`` into ``out``."""
    summary = summarize(rows)
    checks = ordering_checks(rows, summary)
    payload = {"runs": rows, "summary": summary, "checks": checks, "wall_seconds": wall,
               "environment": _env(), **extra}
    atomic_write_text(out / "results.json", json.dumps(M.to_jsonable(payload), indent=1))
    md = [f"# {title}\n", intro, "\n## Results (mean ± std over seeds)\n",
          "✓ / ✗: the better-generalising minimum has the lower G (the paper's claim): normal "
          "against adversarial and large norm, wide margin against normal on the checkerboard. "
          "G uses the rule in the settings (max: the reference code's Table 1); G_mean is "
          "the paper's Eq. 6. A collapsed Hessian (trace at round-off level or all "
          "training gradients zero) gives no G.\n\n",
          _table_md(summary, checks, paper), "\n## Orderings\n", _checks_md(checks)]
    for key, val in extra.items():
        if key.endswith("_md"):
            md.append(val)
    md.append("\n## Per run\n\n| dataset | setup | seed | G | eps | trace | λ_max | ‖θ‖ | train acc "
              "| test acc | collapsed |\n|" + "---|" * 11 + "\n")
    for r in rows:
        g = "n/a" if r.get("G") is None else f"{r['G']:.4f}"
        md.append(f"| {r['dataset']} | {r['setup']} | {r['seed']} | {g} | {r['eps']:.4f} "
                  f"| {r['trace']:.4g} | {r['lambda_max']:.4g} | {r['param_norm']:.2f} "
                  f"| {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r.get('collapse_reason') or ''} |\n")
    if figures:
        md.append("\n## Figures\n")
        for caption, fname in figures:
            md.append(f"\n**{caption}**\n\n![{caption}]({fname})\n")
    md.append(f"\nWall time: {wall:.1f} s ({_env()['threads']} torch threads, torch "
              f"{torch.__version__}); timings on a shared machine are noisy.\n")
    atomic_write_text(out / "report.md", "".join(md))
    return out / "report.md", out / "results.json"


def _settings_md(settings: Settings, datasets: Sequence[str], seeds: Sequence[int]) -> str:
    lines = [f"Settings: profile **{settings.profile}**, rule **{settings.rule}**, seeds "
             f"{list(seeds)}, {settings.dtype} Hessian (exact up to p = "
             f"{settings.max_exact_params}), eps from {settings.num_directions} random "
             f"directions (seed {settings.eps_seed}).\n"]
    for d in datasets:
        w = settings.width_for(d)
        ref = {ph: reference_config(d, ph).epochs for ph in ("normal", "random-label",
                                                             "adversarial", "large-norm")}
        lines.append(f"* {d}: width {w if w is not None else 'reference'} "
                     f"(reference {'100' if d.split('-')[0] not in ('iris', 'digits', 'mnist') else 'same'}), "
                     f"epochs {phase_epochs(d, settings)} (reference {ref})\n")
    return "".join(lines)


# ----------------------------------------------------------------------------- figures
def _map_rows(entries: Sequence[tuple[str, nn.Module, torch.Tensor, torch.Tensor, str]],
              ds: Dataset, settings: Settings, k: int) -> list[P.MapRow]:
    rows = []
    for label, model, vecs, evals, note in entries:
        m = _model64(model, settings)
        g = M.grid_alignment(m, vecs[:, :k], ds.extent, settings.resolution)
        rows.append(P.MapRow(label, g, evals[:k], ds.X_train, ds.y_train, note=note))
    return rows


def _note(row: dict) -> str:
    g = P.g_note(row.get("G"), lower_bound=bool(row.get("G_lower_bound")),
                 rule=row.get("G_rule", "max"))
    return f"{g}, tr = {row['trace']:.3g}"


def _setup_figures(out: Path, root: Path, dataset: str, setups: Sequence[str], seed: int,
                   rows: list[dict], models: dict[str, TrainResult], settings: Settings, k: int,
                   prefix: str = "") -> tuple[list[tuple[str, str]], dict]:
    """Alignment maps, spectra and per-sample alignment of ``setups`` on one dataset.

    Figures go to ``out``; runs (arrays, model cache) are read from ``root``.
    """
    store = RunStore(root)
    ds = load_dataset(dataset)
    byname = {run_name(r["dataset"], r["setup"], r["seed"]): r for r in rows}
    entries, spectra, panels = [], {}, {}
    for setup in setups:
        name = run_name(dataset, setup, seed)
        if name not in byname:
            continue
        arr = store.arrays(name)
        row = byname[name]
        res = models.get(name) or _train(dataset, setup, [seed], settings, root, True)[0]
        entries.append((setup, res.model, arr["top_vectors"], arr["eigenvalues"], _note(row)))
        spectra[setup] = arr["eigenvalues"]
        panels[setup] = (arr["alignments"], arr["labels"],
                         f"{_note(row)}\n$\\lambda_1$ = {row['lambda_max']:.3g}")
    figs: list[tuple[str, str]] = []
    extra: dict = {}
    if not entries:
        return figs, extra
    if ds.extent is not None:
        map_rows = _map_rows(entries, ds, settings, k)
        fname = f"{prefix}alignment_maps.png"
        P.plot_alignment_maps(map_rows, out / fname,
                              title=f"{dataset}: alignment with the top-{k} Hessian eigenvectors (seed {seed})")
        figs.append((f"{dataset}: decision boundaries and alignment maps (seed {seed})", fname))
        extra["boundary_peaks"] = {r.label: M.boundary_peak_report(r.grid) for r in map_rows}
    fname = f"{prefix}spectra.png"
    P.plot_spectra(spectra, out / fname)
    figs.append((f"{dataset}: Hessian spectra (seed {seed})", fname))
    fname = f"{prefix}sample_alignment.png"
    P.plot_sample_alignment(panels, out / fname, k=_KEEP)
    figs.append((f"{dataset}: training-point alignment with the top {_KEEP} eigenvectors", fname))
    return figs, extra


def _peaks_md(peaks: dict) -> str:
    if not peaks:
        return ""
    lines = ["\n## Do the alignment maps peak on the decision boundary?\n\n"
             "Mean |A_i| on the boundary pixels / elsewhere (ratio > 1: concentrated on the "
             "boundary), and the share of the top-1 % |A_i| pixels within two pixels of the "
             "boundary.\n\n| model | " + " | ".join(f"v{i}" for i in range(1, 6)) + " |\n|"
             + "---|" * 6 + "\n"]
    for label, rep in peaks.items():
        cells = []
        for v in rep["per_vector"][:5]:
            if v.get("ratio") is None:
                cells.append("n/a")
            else:
                cells.append(f"{v['ratio']:.2f} ({v['top1pct_near_boundary']:.0%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def _family_note(f: A.DirectionFamily) -> str:
    return (f"mean|A| {float(f.mean_abs.mean()):.3f}, max {float(f.max_abs.max()):.3f}\n"
            f"{f.count_max}/{f.num_vectors} with max|A| >= eps")


def _appendix_md(reports: dict) -> str:
    """The appendix analyses of :func:`figures` (App. D, E, F, gradient coherence) as Markdown."""
    out = []
    sp = reports.get("scalar_product")
    if sp:
        out.append("\n## Cosine vs scalar product (App. D, gauss normal)\n\nMean |map| on the "
                   "boundary pixels / elsewhere (> 1: concentrated on the boundary) and the "
                   "largest |value| on the grid, per top eigenvector.\n\n| map | "
                   + " | ".join(f"v{i}" for i in range(1, 6)) + " |\n|" + "---|" * 6 + "\n")
        for name, rep in (("cosine", sp["cosine"]), ("scalar product", sp["scalar_product"])):
            cells = [("n/a" if v.get("ratio") is None else f"{v['ratio']:.2f}")
                     + f" (max {v['max_abs']:.3g})" for v in rep["per_vector"][:5]]
            out.append(f"| {name} | " + " | ".join(cells) + " |\n")
    fam = reports.get("direction_families")
    if fam:
        out.append("\n## Directions other than the top eigenvectors (App. E, gauss normal)\n\n"
                   f"eps = {fam['eps']:.4g} over {fam['num_points']} training points "
                   "(predicted-label gradients); counts: vectors of the family above eps (the "
                   "G count restricted to the family).\n\n| directions | mean_s abs(A) | "
                   "max_s abs(A) | max rule | mean rule |\n|---|---|---|---|---|\n")
        for name, f in fam["families"].items():
            out.append(f"| {A.FAMILY_LABELS.get(name, name)} | {f['mean_abs']:.4f} | "
                       f"{f['max_abs']:.4f} | {f['count_max']}/{f['num_vectors']} | "
                       f"{f['count_mean']}/{f['num_vectors']} |\n")
    coh = reports.get("gradient_coherence")
    if coh:
        out.append("\n## Gradient coherence by class (gauss)\n\nMean cosine between the "
                   "predicted-label training gradients of two true classes (i = j left out).\n\n"
                   "| model | within class | between classes | block means (rows: class) |\n"
                   "|---|---|---|---|\n")
        for s, c in coh.items():
            blocks = "; ".join(", ".join("n/a" if v is None else f"{v:.2f}" for v in r)
                               for r in c["block_means"])
            out.append(f"| {s} | {_fmt_float(c['within_class'])} | "
                       f"{_fmt_float(c['between_class'])} | {blocks} |\n")
    pc = reports.get("per_class")
    if pc:
        out.append("\n## Per-class Hessians (App. F, gauss normal)\n\n| class | λ_max | trace "
                   "| top eigenvalues |\n|---|---|---|---|\n")
        for c, d in pc.items():
            top = ", ".join(f"{v:.3g}" for v in d["top_eigenvalues"])
            out.append(f"| {c} | {d['lambda_max']:.4g} | {_fmt_float(d['trace'])} | {top} |\n")
    return "".join(out)


def _fmt_float(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


# ----------------------------------------------------------------------------- experiments
def demo(out: str | Path = "results/demo", *, seeds: Sequence[int] = (0, 1, 2),
         settings: Settings = DEMO_SETTINGS, quiet: bool = False) -> dict:
    """The main job on the gaussian data: normal, adversarial and large-norm models.

    Trains the three setups (budget profile: width 50, normal 2,000 epochs, random labels
    40,000, adversarial 2,000, large norm 1,000), computes exact float64 spectra, eps, G,
    trace, lambda_max, norms and alignments, and writes ``report.md``, ``results.json`` and PNG
    figures into ``out``.

    Returns:
        The ``results.json`` payload.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_writable("hbk.boundary.demo", out)
    rows, models = run_grid(["gauss"], TABLE1_SETUPS, seeds, settings, out, quiet=quiet)
    t_runs = time.perf_counter() - t0
    figs, extra = _setup_figures(out, out, "gauss", TABLE1_SETUPS, seeds[0], rows, models,
                                 settings, k=settings.k_maps)
    intro = (
        "The paper's main experiment on the gaussian data (3 classes, 150 training points): "
        "normal training, adversarial initialisation (train on random labels first) and a "
        "large-norm initialisation (a fresh init rescaled to the random-label model's norm).\n\n"
        "**Shortened schedule and narrower net** (demo budget, measured to reproduce the "
        "Table 1 ordering on 2 cores): FNN_2layer 2-50-50-3 (p = 2,853) instead of 2-100-100-3 "
        "(p = 10,703); random-label pretraining 40,000 epochs instead of 300,000; adversarial "
        "fine-tune 2,000 instead of 20,000; normal 2,000 and large norm 1,000 as the "
        "reference. Exact float64 Hessians.\n\n" + _settings_md(settings, ["gauss"], seeds))
    payload_extra = {"settings": settings.to_dict(), "seeds": list(seeds),
                     "boundary_peaks": extra.get("boundary_peaks", {}),
                     "peaks_md": _peaks_md(extra.get("boundary_peaks", {})),
                     "timing": {"runs_seconds": t_runs,
                                "figures_seconds": time.perf_counter() - t0 - t_runs}}
    wall = time.perf_counter() - t0
    write_report(out, "hbk demo: the Hessian encodes the decision boundary (gaussian)", intro,
                 rows, figs, payload_extra, wall, PAPER_TABLE1)
    return json.loads((out / "results.json").read_text())


def table1(out: str | Path = "results/reproduce", *, datasets: Sequence[str] = TABLE1_DATASETS,
           seeds: Sequence[int] = (0, 1, 2), settings: Settings = DEMO_SETTINGS,
           quiet: bool = False) -> dict:
    """Table 1: the five 2-D datasets x normal / adversarial / large norm (+ wide margin).

    The checkerboard also gets the wide-margin setup and margin estimates of its normal and
    wide-margin models (the paper's Fig. 18 comparison).

    Returns:
        The ``results.json`` payload (``out/table1``).
    """
    t0 = time.perf_counter()
    root = Path(out)
    dest = root / "table1"
    _check_names("hbk.boundary.table1", datasets, TABLE1_DATASETS)
    check_writable("hbk.boundary.table1", dest)
    rows, _ = run_grid(datasets, TABLE1_SETUPS + ("wide-margin",), seeds, settings, root,
                       margins=True, quiet=quiet)
    intro = ("Table 1 of the paper: G, trace, lambda_max and the parameter norm of normal, "
             "adversarial and large-norm minima on the five 2-D datasets; the checkerboard "
             "also compares the narrow-margin (normal) and wide-margin minima, with margin "
             f"estimates ({settings.margin_restarts} restarts x {settings.margin_steps} steps; "
             "reference 20,000 steps).\n\n" + _settings_md(settings, datasets, seeds))
    wall = time.perf_counter() - t0
    write_report(dest, "hbk reproduce table1", intro, rows, [],
                 {"settings": settings.to_dict(), "seeds": list(seeds)}, wall, PAPER_TABLE1)
    return json.loads((dest / "results.json").read_text())


def table2(out: str | Path = "results/reproduce", *, datasets: Sequence[str] = TABLE2_DATASETS,
           seeds: Sequence[int] = (0, 1, 2), settings: Settings | None = None,
           quiet: bool = False) -> dict:
    """Table 2: Iris and the digit subsets (offline stand-ins for MNIST), normal vs adversarial.

    Returns:
        The ``results.json`` payload (``out/table2``).
    """
    settings = settings or Settings()
    t0 = time.perf_counter()
    root = Path(out)
    dest = root / "table2"
    if isinstance(datasets, str) or not isinstance(datasets, Sequence):
        fail("hbk.boundary.table2", "datasets to be a list of names", datasets, TypeError)
    for d in datasets:
        check_dataset_name("hbk.boundary.table2", d)
    check_writable("hbk.boundary.table2", dest)
    rows, _ = run_grid(datasets, TABLE2_SETUPS, seeds, settings, root, quiet=quiet)
    intro = ("Table 2 of the paper on Iris and the 8x8 digit subsets (scikit-learn's digits: "
             "the offline stand-in for the MNIST subsets; the CNN on 8x8 inputs). "
             "Paper values are for MNIST.\n\n" + _settings_md(settings, datasets, seeds))
    paper = {("digits-" + k.split("-")[1] if k.startswith("mnist") else k): v
             for k, v in PAPER_TABLE2.items()}
    wall = time.perf_counter() - t0
    write_report(dest, "hbk reproduce table2", intro, rows, [],
                 {"settings": settings.to_dict(), "seeds": list(seeds)}, wall, paper)
    return json.loads((dest / "results.json").read_text())


def figures(out: str | Path = "results/reproduce", *, datasets: Sequence[str] = TABLE1_DATASETS,
            seed: int = 0, settings: Settings = DEMO_SETTINGS, quiet: bool = False,
            digits: str | None = "digits-017", dynamics_epochs: Sequence[int] = (0, 10, 100, 500, 2000)
            ) -> dict:
    """The paper's figures for one seed (``out/figures``).

    * boundaries.png (Figs. 2, 5): the normal models of ``datasets``, top-5 maps;
    * gauss_alignment_maps / gauss_spectra / gauss_sample_alignment (Figs. 1-3): the three
      gaussian setups, top-7 maps;
    * random_directions.png (Fig. 7): top vs bottom vs random eigenvectors vs random
      directions;
    * per_class.png (Fig. 9): per-class Hessians of the gaussian normal model;
    * dynamics.png / dynamics_curves.png (Fig. 13): alignment during normal training;
    * checkerboard.png and margin.png (Fig. 18): narrow vs wide margin;
    * reparameterization.png (Fig. 19) and its invariance report;
    * covariance.png (Fig. 26): Hessian vs gradient-covariance eigenvectors;
    * bulk_scaling.png: bulk and outliers of gauss normal models at widths 8-64 (Sagun et al.);
    * digits_tsne.png / digits_plane.png (Fig. 3 stand-in): t-SNE and the plane through three
      inputs for ``digits`` normal vs adversarial.

    Returns:
        ``{"figures": [...], "reports": {...}}`` (also written to ``figures.json``).
    """
    t0 = time.perf_counter()
    root = Path(out)
    dest = root / "figures"
    fn = "hbk.boundary.figures"
    _check_names(fn, datasets, TABLE1_DATASETS)
    if digits is not None:
        check_dataset_name(fn, digits)
        if not digits.startswith("digits"):
            fail(fn, "digits to be None or a digits-<classes> name", digits)
    check_int(fn, "seed", seed, 0)
    check_writable(fn, dest)
    store = RunStore(root)
    seeds = [seed]
    figs: list[tuple[str, str]] = []
    reports: dict[str, Any] = {}
    two_d = [d for d in datasets if d in TABLE1_DATASETS]

    def get(dataset: str, setup: str):
        rows, models = run_grid([dataset], [setup], seeds, settings, root, quiet=True)
        name = run_name(dataset, setup, seed)
        res = models.get(name) or _train(dataset, setup, seeds, settings, root, True)[0]
        return rows[0], store.arrays(name), res

    steps = []
    if two_d:
        steps.append("boundaries")
    if "gauss" in two_d:
        steps += ["gauss", "scalar", "random", "coherence", "per_class", "dynamics", "reparam",
                  "covariance"]
    if "gauss" in two_d:
        steps.append("bulk_scaling")
    if "checkerboard-linear" in two_d:
        steps.append("checkerboard")
    if digits:
        steps.append("digits")
    from tqdm.auto import tqdm

    for step in tqdm(steps, desc="figures", disable=quiet):
        if step == "boundaries":
            rows = []
            for d in two_d:
                row, arr, res = get(d, "normal")
                ds = load_dataset(d)
                rows += [P.MapRow(d, M.grid_alignment(_model64(res.model, settings),
                                                      arr["top_vectors"][:, :5], ds.extent,
                                                      settings.resolution),
                                  arr["eigenvalues"][:5], ds.X_train, ds.y_train, _note(row))]
            P.plot_alignment_maps(rows, dest / "boundaries.png",
                                  title="Top Hessian eigenvectors encode the decision boundary")
            reports["boundary_peaks"] = {r.label: M.boundary_peak_report(r.grid) for r in rows}
            figs.append(("Figs. 2/5: normal models, top-5 alignment maps", "boundaries.png"))
        elif step == "gauss":
            rows_g, models = [], {}
            for s in TABLE1_SETUPS:
                row, _, res = get("gauss", s)
                rows_g.append(row)
                models[run_name("gauss", s, seed)] = res
            f, extra = _setup_figures(dest, root, "gauss", TABLE1_SETUPS, seed, rows_g, models,
                                      settings, k=7, prefix="gauss_")
            figs += f
            reports["gauss_boundary_peaks"] = extra.get("boundary_peaks")
        elif step == "scalar":
            row, arr, res = get("gauss", "normal")
            ds = load_dataset("gauss")
            m = _model64(res.model, settings)
            V, ev = arr["top_vectors"][:, :5].to(torch.float64), arr["eigenvalues"][:5]
            cos = M.grid_alignment(m, V, ds.extent, settings.resolution)
            sp = M.grid_alignment(m, V, ds.extent, settings.resolution, normalize=False)
            lbl = r"$\langle g(x), v_i \rangle$"
            rows = [P.MapRow("cosine", cos, ev, ds.X_train, ds.y_train),
                    P.MapRow("scalar product", sp, ev, ds.X_train, ds.y_train, cbar_label=lbl),
                    P.MapRow("scalar product\n(own scale)", sp, ev, ds.X_train, ds.y_train,
                             vmax=None, cbar_label=lbl)]
            P.plot_alignment_maps(rows, dest / "scalar_product_maps.png",
                                  title="gauss normal: cosine vs scalar product (colour bar "
                                        "[-1, 1], then the row's own scale)")
            reports["scalar_product"] = {"cosine": M.boundary_peak_report(cos),
                                         "scalar_product": M.boundary_peak_report(sp)}
            figs.append(("Fig. 6: cosine vs scalar product (gauss normal)",
                         "scalar_product_maps.png"))
        elif step == "random":
            row, arr, res = get("gauss", "normal")
            ds = load_dataset("gauss")
            m = _model64(res.model, settings)
            fams = A.family_vectors(M.compute_spectrum(m, ds.train_data()), 5, seed=seed)
            fam = A.direction_families(m, ds.X_train, fams, num_directions=settings.num_directions,
                                       eps_seed=settings.eps_seed)
            fam.save(dest / "direction_families.json")
            reports["direction_families"] = fam.to_dict()
            rows = [P.MapRow(A.FAMILY_LABELS[name], M.grid_alignment(m, V, ds.extent,
                                                                     settings.resolution),
                             ev, ds.X_train, ds.y_train, note=_family_note(fam.families[name]))
                    for name, (V, ev) in fams.items()]
            P.plot_alignment_maps(rows, dest / "random_directions.png",
                                  vector_names=[f"#{i}" for i in range(1, 6)],
                                  title="gauss normal: top / bottom / random eigenvectors / random directions")
            figs.append(("Fig. 7: only the top eigenvectors align with the boundary",
                         "random_directions.png"))
        elif step == "coherence":
            ds = load_dataset("gauss")
            panels = {}
            for s in ("normal", "adversarial"):
                _, _, res = get("gauss", s)
                panels[s] = A.gradient_coherence(_model64(res.model, settings), ds.train_data())
            P.plot_gradient_coherence(panels, dest / "gradient_coherence.png",
                                      title="gauss: cosines of the training gradients (predicted "
                                            "labels), ordered by true class")
            reports["gradient_coherence"] = {s: c.to_dict() for s, c in panels.items()}
            figs.append(("Gradient coherence by class: normal vs adversarial",
                         "gradient_coherence.png"))
        elif step == "per_class":
            row, arr, res = get("gauss", "normal")
            ds = load_dataset("gauss")
            m = _model64(res.model, settings)
            cs = M.class_spectra(m, ds.train_data(), k=3)
            rows = [P.MapRow(f"class {c}", M.grid_alignment(m, s.eigenvectors[:, :3], ds.extent,
                                                            settings.resolution),
                             s.eigenvalues[:3], ds.X_train, ds.y_train) for c, s in cs.items()]
            P.plot_alignment_maps(rows, dest / "per_class.png",
                                  title="Hessians of the per-class losses (gauss normal)")
            reports["per_class"] = A.class_spectra_summary(cs)
            figs.append(("Fig. 9: per-class Hessians", "per_class.png"))
        elif step == "dynamics":
            ds = load_dataset("gauss")
            total = phase_epochs("gauss", settings)["normal"]
            every = _gcd_epochs([e for e in dynamics_epochs if 0 < e <= total] + [total])
            res = train_setups("normal", "gauss", seeds, width=settings.width_for("gauss"),
                               epochs=phase_epochs("gauss", settings), cache_dir=root / "models",
                               quiet=True, checkpoint_every=every)[0]
            want = sorted({e for e in dynamics_epochs if e <= total} | {total})
            ckpts = {e: sd for e, sd in res.checkpoints if e in want}
            rows, curves, eps_ = [], [], []
            for e, sd in sorted(ckpts.items()):
                m = M.as_dtype_model(res.model, torch.float64)
                m.load_state_dict({k: v.to(torch.float64) for k, v in sd.items()})
                spec = M.compute_spectrum(m, ds.train_data())
                rows.append(P.MapRow(f"epoch {e}", M.grid_alignment(m, spec.top(5), ds.extent,
                                                                    settings.resolution),
                                     spec.eigenvalues[:5], ds.X_train, ds.y_train))
                curves.append(M.gradient_alignment(m, ds.X_train, spec.top(5)))
                eps_.append(e)
            P.plot_alignment_maps(rows, dest / "dynamics.png",
                                  title="gauss normal training: alignment during training")
            P.plot_alignment_curves(eps_, curves, dest / "dynamics_curves.png",
                                    title="mean |alignment| of training points")
            figs += [("Fig. 13: alignment maps during training", "dynamics.png"),
                     ("Alignment of training points during training", "dynamics_curves.png")]
        elif step == "reparam":
            row, arr, res = get("gauss", "normal")
            ds = load_dataset("gauss")
            rep = M.reparameterization_report(res.model, ds.train_data(),
                                              max_exact_params=settings.max_exact_params)
            reports["reparameterization"] = rep.to_dict()
            rows = []
            for lbl, an in (("original", rep.before), ("sharper (0.2, 5, 1)", rep.after)):
                mm = _model64(res.model, settings) if lbl == "original" else M.reparameterize(
                    _model64(res.model, settings))
                rows.append(P.MapRow(lbl, M.grid_alignment(mm, an.spectrum.top(5), ds.extent,
                                                           settings.resolution),
                                     an.spectrum.eigenvalues[:5], ds.X_train, ds.y_train,
                                     note=P.g_note(an.G, lower_bound=an.G_lower_bound,
                                                   rule=an.G_rule)))
            P.plot_alignment_maps(rows, dest / "reparameterization.png",
                                  title="alpha-reparameterisation: same function, different Hessian")
            P.plot_spectra({"normal": rep.before.spectrum.eigenvalues,
                            "sharper": rep.after.spectrum.eigenvalues},
                           dest / "reparameterization_spectra.png")
            figs += [("Fig. 19: reparameterisation", "reparameterization.png"),
                     ("Fig. 19: spectra before / after", "reparameterization_spectra.png")]
        elif step == "covariance":
            row, arr, res = get("gauss", "normal")
            ds = load_dataset("gauss")
            m = _model64(res.model, settings)
            V = arr["top_vectors"][:, :5].to(torch.float64)
            ov = M.covariance_overlaps(m, ds.train_data(), V, arr["eigenvalues"][:5])
            reports["covariance_overlaps"] = ov.to_dict()
            rows = [P.MapRow("Hessian H", M.grid_alignment(m, V[:, :3], ds.extent,
                                                           settings.resolution),
                             arr["eigenvalues"][:3], ds.X_train, ds.y_train),
                    P.MapRow("covariance Σ", M.grid_alignment(m, ov.covariance_vectors[:, :3],
                                                              ds.extent, settings.resolution),
                             ov.covariance_eigenvalues[:3], ds.X_train, ds.y_train,
                             note="β = " + ", ".join(f"{b:.2f}" for b in ov.betas[:3].tolist()))]
            P.plot_alignment_maps(rows, dest / "covariance.png",
                                  title="Hessian vs gradient-covariance eigenvectors (gauss normal)")
            figs.append(("Fig. 26: Hessian vs gradient covariance", "covariance.png"))
        elif step == "bulk_scaling":  # Sagun et al.: bulk vs width at fixed data (gauss)
            from .questions import bulk_scaling, bulk_widths

            bs = bulk_scaling(root, seeds=seeds, settings=settings,
                              widths=bulk_widths(settings), figure=dest / "bulk_scaling.png")
            reports["bulk_scaling"] = bs.summary
            figs.append(("Sagun et al.: bulk and outliers vs width (gauss normal)",
                         "bulk_scaling.png"))
        elif step == "checkerboard":
            panels, rows = [], []
            ds = load_dataset("checkerboard-linear")
            for s in ("normal", "wide-margin"):
                rws, models = run_grid(["checkerboard-linear"], [s], seeds, settings, root,
                                       margins=True, quiet=True)
                row = rws[0]
                name = run_name("checkerboard-linear", s, seed)
                arr = store.arrays(name)
                res = models.get(name) or _train("checkerboard-linear", s, seeds, settings, root, True)[0]
                g = M.grid_alignment(_model64(res.model, settings), arr["top_vectors"][:, :3],
                                     ds.extent, settings.resolution)
                rows.append(P.MapRow(s, g, arr["eigenvalues"][:3], ds.X_train, ds.y_train,
                                     note=_note(row)))
                md = row["margin_detail"]
                mr = _margin_from_dict(md, arr["margin_x_restarts"])
                panels.append((s, g, mr))
                reports.setdefault("margins", {})[s] = row["margin"]
            P.plot_alignment_maps(rows, dest / "checkerboard.png",
                                  title="checkerboard: narrow (normal) vs wide margin")
            P.plot_margins(panels, ds.X_train, ds.y_train, dest / "margin.png")
            figs += [("Fig. 18: checkerboard narrow vs wide margin", "checkerboard.png"),
                     ("Fig. 18: margin estimation", "margin.png")]
        elif step == "digits":
            ds = load_dataset(digits)
            emb = P.tsne_embedding(ds.X_train, seed=42)
            rows_e, spectra, plane_rows = [], [], []
            anchors = [int((ds.y_train == c).nonzero()[0]) for c in range(min(3, ds.num_classes))]
            for s in TABLE2_SETUPS:
                row, arr, res = get(digits, s)
                rows_e.append((s, emb, ds.y_train, arr["alignments"], arr["eigenvalues"][:5]))
                spectra.append(arr["eigenvalues"])
                if len(anchors) == 3:
                    m = _model64(res.model, settings)
                    g = M.plane_alignment(m, [ds.X_train[i] for i in anchors],
                                          arr["top_vectors"][:, :5].to(torch.float64),
                                          resolution=min(settings.resolution, 60))
                    plane_rows.append(P.MapRow(s, g, arr["eigenvalues"][:5], note=_note(row),
                                               anchors=[(0, 0, f"x0 (class {int(ds.y_train[anchors[0]])})"),
                                                        (1, 0, f"x1 (class {int(ds.y_train[anchors[1]])})"),
                                                        (0, 1, f"x2 (class {int(ds.y_train[anchors[2]])})")],
                                               axis_labels=("a", "b")))
            P.plot_embedding_alignment(rows_e, dest / "digits_tsne.png", spectra=spectra)
            figs.append((f"Fig. 3 stand-in: {digits} t-SNE coloured by alignment", "digits_tsne.png"))
            if plane_rows:
                P.plot_alignment_maps(plane_rows, dest / "digits_plane.png",
                                      title=f"{digits}: the plane through three training inputs")
                figs.append((f"{digits}: alignment on the plane through three inputs",
                             "digits_plane.png"))
    wall = time.perf_counter() - t0
    payload = {"figures": [{"caption": c, "file": f} for c, f in figs], "reports": reports,
               "wall_seconds": wall, "settings": settings.to_dict(), "seed": seed}
    atomic_write_text(dest / "figures.json", json.dumps(M.to_jsonable(payload), indent=1))
    md = ["# hbk reproduce figures\n", f"Seed {seed}; {_settings_md(settings, two_d, seeds)}"]
    md.append(_peaks_md(reports.get("boundary_peaks") or {}))
    md.append(_appendix_md(reports))
    if "margins" in reports:
        md.append("\nMargins: " + ", ".join(f"{k} {v:.3f}" for k, v in reports["margins"].items()) + "\n")
    if "reparameterization" in reports:
        r = reports["reparameterization"]
        md.append(f"\nReparameterisation: predictions equal {r['predictions_equal']}, max |Δf| "
                  f"{r['max_abs_output_diff']:.2e}, G {r['G_before']} -> {r['G_after']}, "
                  f"lambda_max {r['lambda_max_before']:.4g} -> {r['lambda_max_after']:.4g}\n")
    if "covariance_overlaps" in reports:
        b = reports["covariance_overlaps"]["betas"]
        md.append("\nHessian vs covariance overlaps β_i: " + ", ".join(f"{float(v):.3f}" for v in b) + "\n")
    for c, f in figs:
        md.append(f"\n**{c}**\n\n![{c}]({f})\n")
    md.append(f"\nWall time: {wall:.1f} s\n")
    atomic_write_text(dest / "report.md", "".join(md))
    return payload


def _gcd_epochs(epochs: Sequence[int]) -> int:
    g = 0
    for e in epochs:
        g = math.gcd(g, int(e))
    return max(g, 1)


def _margin_from_dict(d: dict, x_restarts: torch.Tensor):
    from .margin import MarginResult

    return MarginResult(
        margin=d["margin"], x_b=torch.tensor(d["x_b"]), x_max=torch.tensor(d["x_max"]),
        x_min=torch.tensor(d["x_min"]), idx_max=d["idx_max"], idx_min=d["idx_min"],
        cos_max=d["cos_max"], cos_min=d["cos_min"], dist_max=d["dist_max"],
        dist_min=d["dist_min"], chosen=d["chosen"], restart_objective=d["restart_objective"],
        restart_cos=d["restart_cos"], restart_margin=d["restart_margin"],
        settings=d["settings"], seconds=d["seconds"], x_restarts=x_restarts)
