"""The ``hbk`` command: demo, train, analyze, reproduce.

``hbk demo`` is the main job (the gaussian data, normal vs adversarial vs large-norm minima);
``hbk train`` trains one setup; ``hbk analyze MODEL`` analyses any saved model or checkpoint;
``hbk reproduce table1|table2|figures`` runs the paper's tables and figures (resumable).
Every subcommand has ``--help``, ``--out``, ``--seed`` and ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .fileio import DamagedFileWarning, atomic_write_text, check_writable, load_torch, read_json

__all__ = ["build_parser", "load_any_model", "main"]


class CliError(ValueError):
    """A problem with what the command was asked to do (printed as one ``hbk: error:`` line)."""


# ----------------------------------------------------------------------------- helpers
def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {s}")
    return v


def _int(s: str, lo: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s}")
    return v


def _positive_int(s: str) -> int:
    return _int(s, 1)


def _nonneg_int(s: str) -> int:
    return _int(s, 0)


def _batch_size(s: str) -> int | str:
    if s == "full":
        return s
    try:
        return _int(s, 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'full' or an integer >= 1, got {s!r}") from None


_BUILTIN_ARCHS = ("fnn", "fnn2", "cnn", "lenet5")


def _arch(s: str) -> str:
    if s in _BUILTIN_ARCHS:
        return s
    mod, _, attr = s.partition(":")
    if not mod or not attr.split(":", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected module:factory (e.g. mymodule:make_model) "
                                         f"or one of {', '.join(_BUILTIN_ARCHS)}, got {s!r}")
    return s


def _bytes(s: str) -> int:
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        v = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes such as 8G or 500M, got "
                                         f"{s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {s!r}")
    return int(v)


def _dataset_name(s: str) -> str:
    from .boundary.datasets import check_dataset_name

    name = _DATASET_ALIASES.get(s, s)
    try:
        return check_dataset_name("dataset", name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None


def _common(p: argparse.ArgumentParser, out: str, seed: int = 0) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"output directory (default {out})")
    p.add_argument("--seed", type=_nonneg_int, default=seed, help=f"random seed (default {seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive_int, default=None,
                   help="hidden width of the 2-D / Iris networks (default: 50 in the budget "
                        "profile, 100 in the reference profile)")
    p.add_argument("--epochs-scale", type=_positive_float, default=1.0, metavar="F",
                   help="multiply every training phase's epochs by F (quick runs)")
    p.add_argument("--rule", choices=("max", "mean"), default="max",
                   help="G rule reported as G: max (reference code, Table 1) or mean (Eq. 6)")
    p.add_argument("--max-exact-params", type=_positive_int, default=None, metavar="P",
                   help="exact float64 spectrum up to P parameters, else top-k Lanczos and a "
                        "lower-bound G (default 6000; 11000 with --profile reference, so the "
                        "reference nets' p = 10,602-10,804 stay exact)")
    p.add_argument("--resolution", type=_positive_int, default=100,
                   help="grid points per axis of the alignment maps (default 100)")


def _settings(args, **over):
    from .boundary.experiments import Settings

    profile = getattr(args, "profile", "budget")
    exact = args.max_exact_params
    if exact is None:
        exact = 11000 if profile == "reference" else 6000
    kw = {"profile": profile, "width": args.width, "epochs_scale": args.epochs_scale,
          "rule": args.rule, "max_exact_params": exact, "resolution": args.resolution}
    if getattr(args, "margin_steps", None) is not None:
        kw["margin_steps"] = args.margin_steps
    kw.update(over)
    return Settings(**kw)


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hbk`` (one subparser per subcommand)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hbk",
        description="Hessian eigenvectors and the decision boundary: train classifiers, "
                    "compute exact Hessian spectra, alignments and the G measure, and "
                    "reproduce the paper's tables and figures.",
    )
    parser.add_argument("--version", action="version", version=f"hbkernels {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "demo", help="the main job on the gaussian data (normal / adversarial / large norm)",
        description="Train normal, adversarial and large-norm FNN_2layer models on the "
                    "gaussian data (width 50, shortened schedule of the demo budget), compute "
                    "exact float64 Hessian spectra, eps, G, trace, lambda_max and alignments, "
                    "and write report.md, results.json and PNG figures. Resumable: finished "
                    "runs in --out are reused.")
    _common(p, "results/demo")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (default 3)")
    _settings_args(p)
    p.add_argument("--fast", action="store_true",
                   help="a tiny smoke-test budget (1 seed, 1/100 of the epochs, coarse grids); "
                        "the results mean nothing")

    p = sub.add_parser(
        "train", help="train one setup on one dataset and save it",
        description="Train a setup (normal, random-label, adversarial, large-norm, wide-margin) "
                    "with the reference model and hyperparameters (override them with the "
                    "options), and save model.pt, result.json (and checkpoints.pt) in --out.")
    _common(p, "results/train")
    p.add_argument("--dataset", default="gauss", type=_dataset_name,
                   help="dataset name (default gauss)")
    p.add_argument("--setup", default="normal",
                   choices=("normal", "random-label", "adversarial", "large-norm", "wide-margin"))
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width (fnn/fnn2)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of the final phase (default: the reference)")
    p.add_argument("--random-epochs", type=_positive_int, default=None,
                   help="epochs of the random-label phase of adversarial / large-norm runs")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate override")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="batch size override (int >= 1 or 'full')")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop"), default=None)
    p.add_argument("--loss", choices=("ce", "nll", "mse"), default=None)
    p.add_argument("--arch", choices=("fnn", "fnn2", "cnn", "lenet5"), default=None,
                   help="architecture override (default: the reference for the dataset)")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=0, metavar="N",
                   help="keep a state_dict every N epochs (0: none)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache of finished phases (reused random-label models)")

    p = sub.add_parser(
        "analyze", help="analyse any model on any data set (yours or a built-in one)",
        description="Analyse a model: a directory written by `hbk train`, a model.pt of "
                    "save_model, a checkpoints.pt list, a state_dict or a checkpoint dict "
                    "({'model': sd, 'epoch': ...} / {'state_dict': sd}) with --arch "
                    "module:factory (or a built-in fnn/fnn2/cnn/lenet5), a TorchScript file, or "
                    "a pickled nn.Module (with --allow-pickle), on a built-in --dataset or "
                    "your own --data file (.pt or .npz of X, y and optionally X_test, y_test). "
                    "The exact spectrum is used whenever it fits --memory-budget, else the "
                    "top-k Lanczos part and a lower-bound G (labelled so everywhere). Writes "
                    "analysis.json (summary), analysis_full.json + .pt (Analysis.load), "
                    "report.md and figures (PNG and PDF, 300 dpi). Under torchrun the data "
                    "is sharded over the ranks and rank 0 writes.")
    _common(p, "results/analyze", seed=42)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="model file or directory (or --model)")
    p.add_argument("--model", dest="model_opt", default=None, metavar="FILE",
                   help="model file or directory (same as MODEL)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="your data set: a .pt or .npz file of (X, y) (keys X/y or x/y, or a "
                        "tuple; optionally X_test/y_test)")
    p.add_argument("--dataset", default=None, type=_dataset_name,
                   help="built-in dataset name (default: the model's)")
    p.add_argument("--checkpoint", type=_nonneg_int, default=None, metavar="EPOCH",
                   help="analyse the checkpoint of this epoch (default: the final model)")
    p.add_argument("--arch", type=_arch, default=None, metavar="ARCH",
                   help="architecture of a state_dict: module:factory (an importable callable "
                        "that builds the network, e.g. mymodule:make_model, found on sys.path "
                        "or in the current directory; arguments as mymodule:make_model:width=64) "
                        "or a built-in fnn, fnn2, cnn, lenet5")
    p.add_argument("--width", type=_positive_int, default=None)
    p.add_argument("--loss", choices=("ce", "nll", "mse"), default="ce")
    p.add_argument("--rule", choices=("max", "mean"), default="max")
    p.add_argument("--k", type=_positive_int, default=5, help="eigenvectors in the figures")
    p.add_argument("--memory-budget", type=_bytes, default=None, metavar="BYTES",
                   help="memory for the exact spectrum (4 p^2 floats: Hessian, eigenvectors, "
                        "eigh workspace), e.g. 8G or 500M (default: half the available memory)")
    p.add_argument("--max-exact-params", type=_positive_int, default=None, metavar="P",
                   help="an extra cap on p for the exact spectrum (default: none, memory only)")
    p.add_argument("--lanczos-k", type=_positive_int, default=100, metavar="K",
                   help="eigenpairs of the Lanczos path (when the exact spectrum does not fit)")
    p.add_argument("--resolution", type=_positive_int, default=100)
    p.add_argument("--per-class", action="store_true", help="also per-class Hessian spectra")
    p.add_argument("--margin", action="store_true", help="also estimate the margin")
    p.add_argument("--margin-steps", type=_positive_int, default=5000)
    p.add_argument("--no-figures", action="store_true", help="no figures")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (runs code from the file)")

    p = sub.add_parser(
        "reproduce", help="the paper's Table 1, Table 2, figures or open questions (resumable)",
        description="Run Table 1 (five 2-D datasets x normal / adversarial / large norm, plus "
                    "the checkerboard's wide margin and margin estimates), Table 2 (Iris and "
                    "the digit subsets), the figures or the open fidelity questions. Per-run results are cached in --out: "
                    "a rerun skips finished runs. 'doc' writes --dest (docs/reproduction.md) from "
                    "the table results in --out (the paper beside ours, cell by cell).")
    parser.set_defaults(_reproduce_parser=p)
    p.add_argument("what", choices=("table1", "table2", "figures", "questions", "doc"))
    _common(p, "results/reproduce")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   choices=("alpha", "margin", "precision", "large_norm", "bulk"),
                   help="questions: a subset of alpha margin precision large_norm bulk")
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="subset of datasets (table1: gauss circle half-moon hierarchical "
                        "checkerboard; table2: iris digits-017 ...)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument("--profile", choices=("budget", "reference"), default="budget",
                   help="budget: width 50 and shortened schedules; reference: width 100 and "
                        "the reference epochs (hours)")
    p.add_argument("--margin-steps", type=_positive_int, default=None,
                   help="margin search steps (default 5000; reference 20000)")
    p.add_argument("--dest", default="docs/reproduction.md",
                   help="doc: the document to write (readings.md and questions/ beside it are "
                        "included)")
    _settings_args(p)
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    from .boundary.experiments import demo

    over: dict[str, Any] = {}
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.fast:
        over = {"epochs_scale": args.epochs_scale * 0.01, "resolution": min(args.resolution, 30),
                "k_maps": 3}
        seeds = seeds[:1]
    settings = _settings(args, **over)
    check_writable("hbk demo --out", args.out)
    t0 = time.perf_counter()
    payload = demo(args.out, seeds=seeds, settings=settings, quiet=args.quiet)
    _say(args, _summary_lines(payload["runs"]))
    _say(args, f"wrote {Path(args.out) / 'report.md'} and results.json "
               f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _summary_lines(rows: Sequence[dict]) -> str:
    lines = [(f"{'dataset':<20} {'setup':<12} {'seed':>4} {'G':>8} {'eps':>8} {'trace':>10} "
              f"{'lambda_max':>10} {'norm':>8} {'train':>6} {'test':>6}")]
    for r in rows:
        g = "collapsed" if r.get("G") is None else f"{r['G']:.4f}"
        lines.append(f"{r['dataset']:<20} {r['setup']:<12} {r['seed']:>4} {g:>8} "
                     f"{r['eps']:>8.4f} {r['trace']:>10.4g} {r['lambda_max']:>10.4g} "
                     f"{r['param_norm']:>8.2f} {r['train_acc']:>6.3f} {r['test_acc']:>6.3f}")
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from dataclasses import replace

    from .boundary import datasets as D
    from .boundary import models as MD
    from .boundary import training as T

    custom = any(v is not None for v in (args.lr, args.batch_size, args.optimizer, args.loss,
                                         args.arch))
    out = Path(args.out)
    check_writable("hbk train --out", out)
    if args.cache is not None:
        check_writable("hbk train --cache", args.cache)
    t0 = time.perf_counter()
    if not custom:
        epochs = {}
        if args.epochs is not None:
            epochs[args.setup] = args.epochs
        if args.random_epochs is not None:
            epochs["random-label"] = args.random_epochs
        res = T.train_setup(args.setup, args.dataset, seed=args.seed, width=args.width,
                            epochs=epochs or None, cache_dir=args.cache, quiet=args.quiet,
                            checkpoint_every=args.checkpoint_every)
    else:
        if args.setup not in ("normal", "random-label"):
            raise CliError("hbk train: expected --setup normal or random-label with "
                           "--lr/--batch-size/--optimizer/--loss/--arch overrides, got "
                           f"{args.setup}")
        ds = D.load_dataset(args.dataset, random_labels=args.setup == "random-label")
        cfg = T.reference_config(args.dataset, args.setup, seed=args.seed, quiet=args.quiet)
        over = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "optimizer": args.optimizer, "loss": args.loss,
                "checkpoint_every": args.checkpoint_every or None}
        cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
        log_softmax = cfg.loss == "nll"
        if args.arch is None:
            model = MD.default_model_for(ds, args.width, seed=args.seed, log_softmax=log_softmax)
        else:
            kw: dict[str, Any] = {"seed": args.seed, "log_softmax": log_softmax}
            if args.arch in ("fnn", "fnn2"):
                kw["width"] = args.width or (10 if args.arch == "fnn" else 100)
                inf: Any = int(torch.Size(ds.input_shape).numel())
            else:
                inf = ds.input_shape
            model = MD.make_model(args.arch, inf, ds.num_classes, **kw)
        cfg.validate()
        res = T.train(model, ds, cfg)
        res.info.update({"setup": args.setup, "dataset": args.dataset, "seed": args.seed})
    res.save(out)
    _say(args, f"{args.dataset} {args.setup} seed {args.seed}: train acc {res.train_acc:.3f}, "
               f"test acc {res.test_acc:.3f}, |theta| {res.param_norm:.2f}, "
               f"{res.seconds:.1f} s training{' (cached)' if res.cached else ''}; "
               f"saved to {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def load_any_model(
    path: str | Path,
    *,
    dataset=None,
    arch: str | None = None,
    width: int | None = None,
    checkpoint: int | None = None,
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Load a model from any of the formats ``hbk analyze`` accepts.

    Args:
        path: a ``hbk train`` directory, a ``save_model`` file, a ``checkpoints.pt`` list of
            ``(epoch, state_dict)``, a bare state_dict or (with ``allow_pickle``) a pickled
            ``nn.Module``.
        dataset: the :class:`~hbkernels.boundary.datasets.Dataset` (needed to rebuild a model
            from a bare state_dict or checkpoints without a ``model.pt`` beside them).
        arch, width: architecture of a bare state_dict (default: the dataset's reference,
            width inferred from the first weight).
        checkpoint: epoch of the checkpoint to load (default: the final model / last one).
        allow_pickle: allow ``torch.load(weights_only=False)`` for a pickled module.

    Returns:
        ``(model, meta)``; ``meta`` holds what was found (``result.json``, epoch, format).
    """
    from .boundary import models as MD
    from .boundary.training import TrainResult

    p = Path(path)
    meta: dict[str, Any] = {"path": str(p)}
    fn = "hbk analyze"
    if p.is_dir():
        if not (p / "model.pt").exists():
            raise CliError(f"{fn}: expected {p / 'model.pt'} in the model directory, got none")
        if (p / "result.json").exists():  # verified against manifest.json when present
            if not (p / "manifest.json").exists():
                warnings.warn(f"hbk: {p} has no manifest.json (an interrupted save or an older "
                              "hbk): its files cannot be verified", DamagedFileWarning,
                              stacklevel=2)
            model = TrainResult.load(p).model
            meta["result"] = read_json(fn, p / "result.json")
        else:
            model = MD.load_model(p / "model.pt")
        meta["format"] = "hbk train directory"
        if checkpoint is not None:
            if not (p / "checkpoints.pt").exists():
                raise CliError(f"{fn}: expected {p / 'checkpoints.pt'} for --checkpoint, got none")
            ckpts = load_torch(fn, p / "checkpoints.pt", what="a checkpoint list")
            _load_weights(model, _pick_checkpoint(ckpts, checkpoint, meta), p / "checkpoints.pt")
        return model, meta
    if not p.exists():
        raise CliError(f"{fn}: expected an existing model file or directory, got {p}")
    from .boundary import loading as L

    if L._is_torchscript(p):
        if arch is not None and arch in _BUILTIN_ARCHS:
            arch = _build_for_state_dict({}, dataset, arch, width)
        try:
            return L.load_model_file(p, arch, allow_pickle=allow_pickle, fn=fn)
        except ValueError as err:
            raise CliError(str(err).replace("hbk.boundary.load_model_file", fn)) from None
    obj = load_torch(fn, p, allow_pickle=allow_pickle,
                     what="a model file (save_model, checkpoints, state_dict, TorchScript)")
    if isinstance(obj, dict) and not L._is_state_dict(obj) and "spec" not in obj:
        key = next((k for k in L._SD_KEYS if L._is_state_dict(obj.get(k))), None)
        if key is not None:  # a checkpoint dict {"model": sd, "epoch": ...}
            meta["format"] = "checkpoint"
            meta.update({k: v for k, v in obj.items()
                         if isinstance(v, (int, float, str, bool)) and k != key})
            sd = obj[key]
            model = _build_for_state_dict(sd, dataset, arch, width)
            _load_weights(model, sd, p)
            return model, meta
    if isinstance(obj, torch.nn.Module):
        meta["format"] = "pickled module"
        return obj, meta
    if isinstance(obj, dict) and "spec" in obj and "state_dict" in obj:
        meta["format"] = "save_model file"
        model = MD.load_model(obj)
        if (p.parent / "result.json").exists():
            meta["result"] = read_json(fn, p.parent / "result.json")
        return model, meta
    if (isinstance(obj, (list, tuple)) and obj and all(
            isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[1], dict)
            for c in obj)):
        meta["format"] = "checkpoints"
        sd = _pick_checkpoint(obj, checkpoint, meta)
        if (p.parent / "model.pt").exists():
            model = MD.load_model(p.parent / "model.pt")
            if (p.parent / "result.json").exists():
                meta["result"] = read_json(fn, p.parent / "result.json")
        else:
            model = _build_for_state_dict(sd, dataset, arch, width)
        _load_weights(model, sd, p)
        return model, meta
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        meta["format"] = "state_dict"
        model = _build_for_state_dict(obj, dataset, arch, width)
        _load_weights(model, obj, p)
        return model, meta
    what = type(obj).__name__
    if isinstance(obj, torch.Tensor):
        what = f"a tensor of shape {tuple(obj.shape)}"
    elif isinstance(obj, dict):
        what = f"a dict with keys {sorted(map(str, obj))[:5]}"
    raise CliError(f"{fn}: expected a model, checkpoint list or state_dict in {p}, got {what} "
                   "(not a model file)")


def _load_weights(model: torch.nn.Module, sd: dict, path: Path) -> None:
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()
        raise CliError(f"hbk analyze: expected weights for {type(model).__name__} in {path}, "
                       f"got {' '.join(x.strip() for x in first[:3])[:300]}") from None


def _pick_checkpoint(ckpts, epoch: int | None, meta: dict) -> dict:
    try:
        epochs = [int(e) for e, _ in ckpts]
    except (TypeError, ValueError):
        raise CliError("hbk analyze: expected a checkpoint list of (epoch, state_dict), got "
                       f"{type(ckpts).__name__}") from None
    if not epochs:
        raise CliError("hbk analyze: expected at least one checkpoint, got none")
    if epoch is None:
        epoch = epochs[-1]
    if epoch not in epochs:
        raise CliError(f"hbk analyze: expected --checkpoint in {epochs}, got {epoch}")
    meta["epoch"] = epoch
    return dict(ckpts[epochs.index(epoch)][1])


def _build_for_state_dict(sd: dict, dataset, arch: str | None, width: int | None):
    from .boundary import models as MD

    if arch is not None and arch not in _BUILTIN_ARCHS:
        from .boundary.loading import build_architecture

        return build_architecture(arch)
    from .boundary.loading import DataFile

    if dataset is None or (arch is None and isinstance(dataset, DataFile)):
        if dataset is not None:
            raise CliError("hbk analyze: expected --arch module:factory (or a built-in "
                           "architecture) to rebuild a model from a state_dict for --data, got "
                           "none")
        raise CliError("hbk analyze: expected --dataset to rebuild a model from a state_dict")
    first = next((v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2), None)
    if arch in (None, "fnn", "fnn2") and width is None and first is not None:
        width = int(first.shape[0])
    dtype = next(iter(sd.values())).dtype if sd else torch.get_default_dtype()
    if arch is None:
        try:
            return MD.default_model_for(dataset, width, dtype=dtype)
        except ValueError:
            return MD.default_model_for(dataset, None, dtype=dtype)
    inf: Any = int(torch.Size(dataset.input_shape).numel()) if arch in ("fnn", "fnn2") else dataset.input_shape
    kw: dict[str, Any] = {"dtype": dtype}
    if arch in ("fnn", "fnn2"):
        kw["width"] = width or 100
    return MD.make_model(arch, inf, dataset.num_classes, **kw)


def _init_distributed() -> bool:
    """Join the process group torchrun describes (gloo: the analysis runs on the CPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() \
            and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def _check_model_on(fn: str, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    params = list(model.parameters())
    if not params or len({p.dtype for p in params}) != 1 or not params[0].is_floating_point():
        raise CliError(f"{fn}: expected a model with parameters of one floating dtype, got "
                       f"{sorted({str(p.dtype) for p in params}) or 'no parameters'}")
    try:
        with torch.no_grad():
            out = model(X[:2].to(params[0].dtype))
    except Exception as err:  # noqa: BLE001 - any shape error of the user's network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"{fn}: expected the model to take inputs of shape (n, "
                       f"{', '.join(map(str, X.shape[1:]))}), got an error: {first[:200]}") from None
    C = int(y.max()) + 1
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < C:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CliError(f"{fn}: expected model outputs of shape (n, C >= {C}) for labels "
                       f"0..{C - 1}, got {got}")


def _cmd_analyze(args) -> int:
    import torch.distributed as dist

    started = _init_distributed()
    try:
        return _analyze(args)
    finally:
        if started:
            dist.destroy_process_group()


def _analyze(args) -> int:
    import torch.distributed as dist

    from .boundary import datasets as D
    from .boundary import measures as M
    from .boundary import plots as P
    from .boundary.loading import DataFile, load_data_file
    from .boundary.models import check_model_data
    from .boundary.training import accuracy

    fn = "hbk analyze"
    t0 = time.perf_counter()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    quiet = args.quiet or rank != 0
    path = args.model_opt or args.model_pos
    if path is None:
        raise CliError(f"{fn}: expected a model (MODEL or --model FILE), got none")
    if args.model_opt and args.model_pos and args.model_opt != args.model_pos:
        raise CliError(f"{fn}: expected one model, got MODEL {args.model_pos} and --model "
                       f"{args.model_opt}")
    if args.data and args.dataset:
        raise CliError(f"{fn}: expected --data or --dataset, got both")
    out = Path(args.out)
    if rank == 0:
        check_writable("hbk analyze --out", out)
    ds: Any = None
    if args.data:
        ds = load_data_file(args.data, fn=fn)
    elif args.dataset:
        ds = D.load_dataset(args.dataset)
    model, meta = load_any_model(path, dataset=ds, arch=args.arch, width=args.width,
                                 checkpoint=args.checkpoint, allow_pickle=args.allow_pickle)
    if ds is None:
        name = (meta.get("result") or {}).get("info", {}).get("dataset")
        if name is None:
            raise CliError(f"{fn}: expected --data FILE or --dataset NAME (the model file does "
                           "not name its data set)")
        ds = D.load_dataset(D.check_dataset_name(fn, name))
    if isinstance(ds, DataFile):
        _check_model_on(fn, model, ds.X, ds.y)
    else:
        check_model_data(fn, model, ds)
    model.eval()
    m64 = M.as_dtype_model(model, torch.float64)
    X, y = ds.train_data()
    X_test, y_test = ds.X_test, ds.y_test
    names = {"model": Path(path).stem if Path(path).is_file() else Path(path).name,
             "data": ds.name}
    if not quiet:
        print(f"hbk analyze: {names['model']} ({meta.get('format')}, p = "
              f"{sum(p.numel() for p in m64.parameters())}) on {ds.name} ({X.shape[0]} training "
              "points): spectrum, eps, G ...", file=sys.stderr, flush=True)
    an = M.analyze(m64, args.loss, (X, y), rule=args.rule, eps_seed=args.seed,
                   max_exact_params=args.max_exact_params, memory_budget=args.memory_budget,
                   k=args.lanczos_k, per_class=args.per_class, names=names, quiet=quiet)
    if rank != 0:  # every rank computed the same analysis; rank 0 writes
        return 0
    label = an.G_label
    payload: dict[str, Any] = {
        "model": str(path), "format": meta.get("format"), "checkpoint": meta.get("epoch"),
        "dataset": ds.name, "data_file": args.data, "train_acc": accuracy(m64, X.double(), y),
        "test_acc": None if X_test is None else accuracy(m64, X_test.double(), y_test),
        **an.to_dict()}
    figs: list[str] = []
    k = min(args.k, an.spectrum.eigenvectors.shape[1])
    top = an.spectrum.top(k)
    mr = None
    if args.margin:
        from .boundary.margin import estimate_margin

        mr = estimate_margin(m64, (X, y), top[:, 0], loss=args.loss, steps=args.margin_steps,
                             seed=args.seed, quiet=quiet)
        an.margin = mr
        payload["margin"] = mr.to_dict()
    if not args.no_figures:
        from tqdm.auto import tqdm

        two_d = X.dim() == 2 and X.shape[1] == 2
        bar = tqdm(total=3 + int(mr is not None) if two_d else 4, desc="hbk analyze: figures",
                   unit="fig", disable=quiet, leave=False)

        def done(name: str) -> None:
            figs.append(name)
            bar.update(1)

        note = P.g_note(an.G, lower_bound=an.G_lower_bound, rule=an.G_rule,
                        k=int(an.spectrum.eigenvalues.numel()))
        extent = getattr(ds, "extent", None)
        if two_d:
            if extent is None:
                lo, hi = X.double().amin(0), X.double().amax(0)
                pad = 0.1 * (hi - lo).clamp_min(1e-6)
                extent = (float(lo[0] - pad[0]), float(hi[0] + pad[0]),
                          float(lo[1] - pad[1]), float(hi[1] + pad[1]))
            g = M.alignment_map(m64, extent, top, resolution=args.resolution, loss=args.loss)
            P.plot_alignment_maps([P.MapRow(f"{names['model']} on {ds.name}", g,
                                            an.spectrum.eigenvalues[:k], X, y, note)],
                                  out / "alignment_maps.png")
            done("alignment_maps.png")
            payload["boundary_peaks"] = M.boundary_peak_report(g)
            if mr is not None:
                P.plot_margins([(f"{names['model']} on {ds.name}", g, mr)], X, y,
                               out / "margin.png")
                done("margin.png")
        else:
            emb = P.tsne_embedding(X, seed=args.seed)
            P.plot_embedding_alignment([(ds.name, emb, y, an.alignments,
                                         an.spectrum.eigenvalues[:k])],
                                       out / "embedding_alignment.png", k=k,
                                       spectra=[an.spectrum.eigenvalues])
            done("embedding_alignment.png")
            classes = [int(c) for c in torch.unique(y)]
            anchors = [int((y == c).nonzero()[0]) for c in classes][:3]
            if len(anchors) < 3:  # fewer than three classes: add other training points
                anchors += [i for i in range(X.shape[0]) if i not in anchors][: 3 - len(anchors)]
            if len(anchors) == 3:
                g = M.alignment_map(m64, [X[i] for i in anchors], top,
                                    resolution=min(args.resolution, 60), loss=args.loss)
                P.plot_alignment_maps([P.MapRow(f"{names['model']} on {ds.name}", g,
                                                an.spectrum.eigenvalues[:k], note=note,
                                                anchors=[(0, 0, "x0"), (1, 0, "x1"), (0, 1, "x2")],
                                                axis_labels=("a", "b"))],
                                      out / "plane_alignment.png",
                                      title=f"plane through training inputs {anchors}")
                done("plane_alignment.png")
        P.plot_spectra({f"{names['model']} ({label})": an.spectrum.eigenvalues},
                       out / "spectrum.png")
        P.plot_sample_alignment({f"{names['model']} on {ds.name}": (an.alignments, y, note)},
                                out / "sample_alignment.png")
        done("spectrum.png")
        done("sample_alignment.png")
        bar.close()
    figs_all = figs + [f.replace(".png", ".pdf") for f in figs if "pdf" in P.FORMATS]
    payload["figures"] = figs
    payload["figures_pdf"] = [f for f in figs_all if f.endswith(".pdf")]
    payload["wall_seconds"] = time.perf_counter() - t0
    an.save(out / "analysis_full.json")
    atomic_write_text(out / "analysis.json", json.dumps(M.to_jsonable(payload), indent=1))
    report = an.report() + "".join(
        [f"* train accuracy {payload['train_acc']:.4f}"
         + ("" if payload["test_acc"] is None else f", test accuracy {payload['test_acc']:.4f}")
         + "\n", "\n## Figures\n\n"] + [f"![{f}]({f})\n" for f in figs])
    atomic_write_text(out / "report.md", report)
    tr = "n/a" if an.trace is None else f"{an.trace:.4g}"
    _say(args, f"{ds.name}: p = {an.num_params}, {an.G_text()}, eps = {an.eps.eps:.4f}, "
               f"trace = {tr}, lambda_max = {an.lambda_max:.4g}, "
               f"|theta| = {an.param_norm:.2f}, outliers = {an.outliers.count}, spectral type "
               f"{an.spectral_type.type}; wrote {out / 'analysis.json'}, report.md "
               f"({payload['wall_seconds']:.1f} s)")
    return 0


_DATASET_ALIASES = {"checkerboard": "checkerboard-linear", "halfmoon": "half-moon",
                    "half_moon": "half-moon", "gaussian": "gauss", "hierachical": "hierarchical"}


def _cmd_reproduce(args) -> int:
    from .boundary import experiments as E

    seeds = list(range(args.seed, args.seed + args.seeds))
    settings = _settings(args)
    datasets = args.datasets
    check_writable("hbk reproduce --out", args.out)
    t0 = time.perf_counter()
    if args.what == "doc":
        from .boundary.reproduction import write_reproduction

        check_writable("hbk reproduce --dest", Path(args.dest).parent)
        _say(args, f"wrote {write_reproduction(args.out, args.dest)}")
        return 0
    if args.what == "table1":
        payload = E.table1(args.out, datasets=datasets or E.TABLE1_DATASETS, seeds=seeds,
                           settings=settings, quiet=args.quiet)
        dest = Path(args.out) / "table1"
    elif args.what == "table2":
        payload = E.table2(args.out, datasets=datasets or E.TABLE2_DATASETS, seeds=seeds,
                           settings=settings, quiet=args.quiet)
        dest = Path(args.out) / "table2"
    elif args.what == "questions":
        from .boundary.questions import run_questions

        res = run_questions(args.out, only=args.only, seeds=seeds, settings=settings,
                            quiet=args.quiet)
        for r in res.values():
            _say(args, f"{r.title}\n  {r.answer}\n")
        payload = {}
        dest = Path(args.out) / "questions"
    else:
        # --datasets names every figure family: without a digits-<classes> name, no CNN is trained.
        digits = [d for d in datasets or () if d.startswith("digits-")]
        if len(digits) > 1:
            raise ValueError(f"hbk reproduce figures: expected at most one digits-<classes> set, got {digits}")
        two_d = [d for d in datasets or () if not d.startswith("digits-")]
        payload = E.figures(args.out, datasets=two_d if datasets else E.TABLE1_DATASETS,
                            seed=args.seed, settings=settings, quiet=args.quiet,
                            digits=(digits[0] if digits else None) if datasets else "digits-017")
        dest = Path(args.out) / "figures"
    if "runs" in payload:
        _say(args, _summary_lines(payload["runs"]))
    _say(args, f"wrote {dest / 'report.md'} (wall time {time.perf_counter() - t0:.1f} s)")
    return 0


def _check_reproduce(parser: argparse.ArgumentParser, args) -> None:
    """Unknown ``--datasets`` names are usage errors, found before any work."""
    from .boundary import experiments as E
    from .boundary.datasets import check_dataset_name

    if not args.datasets:
        return
    names = [_DATASET_ALIASES.get(d, d) for d in args.datasets]
    allowed = E.TABLE2_DATASETS if args.what == "table2" else E.TABLE1_DATASETS
    for d in names:
        if args.what == "table2":
            try:
                check_dataset_name("hbk reproduce", d)
            except ValueError as err:
                parser.error(f"argument --datasets: {str(err).split(': ', 1)[1]}")
            if d in E.TABLE1_DATASETS:
                parser.error(f"argument --datasets: expected table2 datasets such as "
                             f"{', '.join(allowed)} (the 2-D sets are table1's), got {d!r}")
        elif d not in allowed and not (args.what == "figures" and d.startswith("digits-")):
            extra = ", or one digits-<classes> set" if args.what == "figures" else ""
            parser.error(f"argument --datasets: expected {args.what} datasets from "
                         f"{', '.join(allowed)} (or checkerboard){extra}, got {d!r}")
        elif d not in allowed:
            try:
                check_dataset_name("hbk reproduce", d)
            except ValueError as err:
                parser.error(f"argument --datasets: {str(err).split(': ', 1)[1]}")
    if len(set(names)) != len(names):
        parser.error(f"argument --datasets: expected distinct names, got {names}")
    args.datasets = names


def _one_line(err: BaseException) -> str:
    """The error as one line: the library's message (no traceback, no repeated prefix)."""
    msg = str(err)
    if isinstance(err, OSError) and err.strerror:
        msg = err.strerror
        if not msg.startswith("hbk") and err.filename:
            msg = f"{msg}: {err.filename}"
    if isinstance(err, KeyError):
        msg = f"missing key {msg}"
    msg = " ".join(msg.split()) or type(err).__name__
    msg = msg.removeprefix("hbk: ")
    if not msg.startswith("hbk"):
        msg = f"{type(err).__name__}: {msg}"
    return msg


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    if issubclass(category, DamagedFileWarning):
        print(f"hbk: warning: {text.removeprefix('hbk: ')}",
              file=sys.stderr, flush=True)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(),
              file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hbk`` console script.

    Usage errors (bad options, unknown names) exit with status 2 through argparse; every
    other error is printed as one line ``hbk: error: ...`` with exit status 1 (the traceback
    only with ``--debug``); Ctrl-C exits with 130.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (0 on success).
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "reproduce":
        _check_reproduce(args._reproduce_parser, args)
    handler = {"demo": _cmd_demo, "train": _cmd_train, "analyze": _cmd_analyze,
               "reproduce": _cmd_reproduce}[args.command]
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return handler(args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("hbk: interrupted (finished runs are kept; rerun to resume)", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - every library error becomes one line
            if args.debug:
                traceback.print_exc()
            print(f"hbk: error: {_one_line(err)}", file=sys.stderr, flush=True)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
