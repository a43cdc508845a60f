"""The ``hbk`` command: demo, train, analyze, reproduce.

``hbk demo`` is the main job (the gaussian data, normal vs adversarial vs large-norm minima);
``hbk train`` trains one setup; ``hbk analyze MODEL`` analyses any saved model or checkpoint;
``hbk reproduce table1|table2|figures`` runs the paper's tables and figures (resumable).
Every subcommand has ``--help``, ``--out``, ``--seed`` and ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "build_parser", "load_any_model"]


# ----------------------------------------------------------------------------- helpers
def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def _common(p: argparse.ArgumentParser, out: str, seed: int = 0) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"output directory (default {out})")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


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
    kw = dict(profile=profile, width=args.width, epochs_scale=args.epochs_scale, rule=args.rule,
              max_exact_params=exact, resolution=args.resolution)
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
    p.add_argument("--dataset", default="gauss", help="dataset name (default gauss)")
    p.add_argument("--setup", default="normal",
                   choices=("normal", "random-label", "adversarial", "large-norm", "wide-margin"))
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width (fnn/fnn2)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of the final phase (default: the reference)")
    p.add_argument("--random-epochs", type=_positive_int, default=None,
                   help="epochs of the random-label phase of adversarial / large-norm runs")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate override")
    p.add_argument("--batch-size", default=None, help="batch size override (int or 'full')")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw", "rmsprop"), default=None)
    p.add_argument("--loss", choices=("ce", "nll", "mse"), default=None)
    p.add_argument("--arch", choices=("fnn", "fnn2", "cnn", "lenet5"), default=None,
                   help="architecture override (default: the reference for the dataset)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="keep a state_dict every N epochs (0: none)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache of finished phases (reused random-label models)")

    p = sub.add_parser(
        "analyze", help="analyse a saved model or checkpoint",
        description="Analyse MODEL: a directory written by `hbk train` (model.pt, result.json, "
                    "checkpoints.pt), a model.pt of save_model, a checkpoints.pt list, a bare "
                    "state_dict (with --dataset and --width/--arch) or a pickled nn.Module "
                    "(with --allow-pickle). Writes analysis.json and figures.")
    _common(p, "results/analyze", seed=42)
    p.add_argument("model", metavar="MODEL", help="model file or directory")
    p.add_argument("--dataset", default=None, help="dataset name (default: the model's)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="EPOCH",
                   help="analyse the checkpoint of this epoch (default: the final model)")
    p.add_argument("--arch", choices=("fnn", "fnn2", "cnn", "lenet5"), default=None)
    p.add_argument("--width", type=_positive_int, default=None)
    p.add_argument("--loss", choices=("ce", "nll", "mse"), default="ce")
    p.add_argument("--rule", choices=("max", "mean"), default="max")
    p.add_argument("--k", type=_positive_int, default=5, help="eigenvectors in the figures")
    p.add_argument("--max-exact-params", type=_positive_int, default=6000, metavar="P")
    p.add_argument("--lanczos-k", type=_positive_int, default=100, metavar="K",
                   help="eigenpairs of the Lanczos path (p > P)")
    p.add_argument("--resolution", type=_positive_int, default=100)
    p.add_argument("--margin", action="store_true", help="also estimate the margin")
    p.add_argument("--margin-steps", type=_positive_int, default=5000)
    p.add_argument("--no-figures", action="store_true", help="only analysis.json")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (runs code from the file)")

    p = sub.add_parser(
        "reproduce", help="the paper's Table 1, Table 2 or figures (resumable)",
        description="Run Table 1 (five 2-D datasets x normal / adversarial / large norm, plus "
                    "the checkerboard's wide margin and margin estimates), Table 2 (Iris and "
                    "the digit subsets) or the figures. Per-run results are cached in --out: "
                    "a rerun skips finished runs.")
    p.add_argument("what", choices=("table1", "table2", "figures"))
    _common(p, "results/reproduce")
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="subset of datasets (table1: gauss circle half-moon hierarchical "
                        "checkerboard; table2: iris digits-017 ...)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument("--profile", choices=("budget", "reference"), default="budget",
                   help="budget: width 50 and shortened schedules; reference: width 100 and "
                        "the reference epochs (hours)")
    p.add_argument("--margin-steps", type=_positive_int, default=None,
                   help="margin search steps (default 5000; reference 20000)")
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
    t0 = time.perf_counter()
    payload = demo(args.out, seeds=seeds, settings=_settings(args, **over), quiet=args.quiet)
    _say(args, _summary_lines(payload["runs"]))
    _say(args, f"wrote {Path(args.out) / 'report.md'} and results.json "
               f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _summary_lines(rows: Sequence[dict]) -> str:
    lines = [f"{'dataset':<20} {'setup':<12} {'seed':>4} {'G':>8} {'eps':>8} {'trace':>10} "
             f"{'lambda_max':>10} {'norm':>8} {'train':>6} {'test':>6}"]
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
            raise SystemExit("hbk train: expected --setup normal or random-label with "
                             "--lr/--batch-size/--optimizer/--loss/--arch overrides, got "
                             f"{args.setup}")
        ds = D.load_dataset(args.dataset, random_labels=args.setup == "random-label")
        cfg = T.reference_config(args.dataset, args.setup, seed=args.seed, quiet=args.quiet)
        bs = args.batch_size
        if bs is not None and bs != "full":
            bs = int(bs)
        cfg = replace(cfg, **{k: v for k, v in dict(
            epochs=args.epochs, lr=args.lr, batch_size=bs, optimizer=args.optimizer,
            loss=args.loss, checkpoint_every=args.checkpoint_every or None).items() if v is not None})
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

    p = Path(path)
    meta: dict[str, Any] = {"path": str(p)}
    fn = "hbk analyze"
    if p.is_dir():
        if (p / "result.json").exists():
            meta["result"] = json.loads((p / "result.json").read_text())
        if not (p / "model.pt").exists():
            raise SystemExit(f"{fn}: expected {p / 'model.pt'} in the model directory, got none")
        model = MD.load_model(p / "model.pt")
        meta["format"] = "hbk train directory"
        if checkpoint is not None:
            if not (p / "checkpoints.pt").exists():
                raise SystemExit(f"{fn}: expected {p / 'checkpoints.pt'} for --checkpoint, got none")
            model.load_state_dict(_pick_checkpoint(torch.load(p / "checkpoints.pt", weights_only=True),
                                                   checkpoint, meta))
        return model, meta
    if not p.exists():
        raise SystemExit(f"{fn}: expected an existing model file or directory, got {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError
        if not allow_pickle:
            raise SystemExit(f"{fn}: {p} is not a weights-only file ({type(exc).__name__}); if it "
                             "is a pickled nn.Module you trust, pass --allow-pickle") from exc
        obj = torch.load(p, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        meta["format"] = "pickled module"
        return obj, meta
    if isinstance(obj, dict) and "spec" in obj and "state_dict" in obj:
        meta["format"] = "save_model file"
        model = MD.load_model(obj)
        if (p.parent / "result.json").exists():
            meta["result"] = json.loads((p.parent / "result.json").read_text())
        return model, meta
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (list, tuple)):
        meta["format"] = "checkpoints"
        sd = _pick_checkpoint(obj, checkpoint, meta)
        if (p.parent / "model.pt").exists():
            model = MD.load_model(p.parent / "model.pt")
            if (p.parent / "result.json").exists():
                meta["result"] = json.loads((p.parent / "result.json").read_text())
        else:
            model = _build_for_state_dict(sd, dataset, arch, width)
        model.load_state_dict(sd)
        return model, meta
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        meta["format"] = "state_dict"
        model = _build_for_state_dict(obj, dataset, arch, width)
        model.load_state_dict(obj)
        return model, meta
    raise SystemExit(f"{fn}: expected a model, checkpoint list or state_dict in {p}, got "
                     f"{type(obj).__name__}")


def _pick_checkpoint(ckpts, epoch: int | None, meta: dict) -> dict:
    epochs = [int(e) for e, _ in ckpts]
    if not epochs:
        raise SystemExit("hbk analyze: expected at least one checkpoint, got none")
    if epoch is None:
        epoch = epochs[-1]
    if epoch not in epochs:
        raise SystemExit(f"hbk analyze: expected --checkpoint in {epochs}, got {epoch}")
    meta["epoch"] = epoch
    return dict(ckpts[epochs.index(epoch)][1])


def _build_for_state_dict(sd: dict, dataset, arch: str | None, width: int | None):
    from .boundary import models as MD

    if dataset is None:
        raise SystemExit("hbk analyze: expected --dataset to rebuild a model from a state_dict")
    first = next((v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2), None)
    if arch is None or arch in ("fnn", "fnn2"):
        if width is None and first is not None and arch != "cnn":
            width = int(first.shape[0])
    dtype = next(iter(sd.values())).dtype
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


def _cmd_analyze(args) -> int:
    from .boundary import datasets as D
    from .boundary import measures as M
    from .boundary import plots as P
    from .boundary.training import accuracy

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = D.load_dataset(args.dataset) if args.dataset else None
    model, meta = load_any_model(args.model, dataset=ds, arch=args.arch, width=args.width,
                                 checkpoint=args.checkpoint, allow_pickle=args.allow_pickle)
    if ds is None:
        name = (meta.get("result") or {}).get("info", {}).get("dataset")
        if name is None:
            raise SystemExit("hbk analyze: expected --dataset (the model file does not name its "
                             "dataset)")
        ds = D.load_dataset(name)
    model.eval()
    m64 = M.as_dtype_model(model, torch.float64)
    X, y = ds.train_data()
    an = M.analyze(m64, (X, y), loss=args.loss, rule=args.rule, eps_seed=args.seed,
                   max_exact_params=args.max_exact_params, k=args.lanczos_k, quiet=args.quiet)
    payload: dict[str, Any] = {
        "model": str(args.model), "format": meta.get("format"), "checkpoint": meta.get("epoch"),
        "dataset": ds.name, "train_acc": accuracy(m64, X.double(), y),
        "test_acc": accuracy(m64, ds.X_test.double(), ds.y_test), **an.to_dict()}
    figs = []
    k = min(args.k, an.spectrum.eigenvectors.shape[1])
    top = an.spectrum.top(k)
    if args.margin:
        from .boundary.margin import estimate_margin

        mr = estimate_margin(m64, (X, y), top[:, 0], steps=args.margin_steps, seed=args.seed,
                             quiet=args.quiet)
        payload["margin"] = mr.to_dict()
    if not args.no_figures:
        note = "collapsed" if an.G is None else f"G = {an.G:.3f}"
        if ds.extent is not None and len(ds.input_shape) == 1 and ds.input_shape[0] == 2:
            g = M.grid_alignment(m64, top, ds.extent, args.resolution, loss=args.loss)
            P.plot_alignment_maps([P.MapRow(ds.name, g, an.spectrum.eigenvalues[:k], X, y, note)],
                                  out / "alignment_maps.png")
            figs.append("alignment_maps.png")
            payload["boundary_peaks"] = M.boundary_peak_report(g)
            if args.margin:
                P.plot_margins([(ds.name, g, mr)], X, y, out / "margin.png")
                figs.append("margin.png")
        elif len(ds.input_shape) >= 1 and int(torch.Size(ds.input_shape).numel()) > 2:
            emb = P.tsne_embedding(X, seed=args.seed)
            P.plot_embedding_alignment([(ds.name, emb, y, an.alignments, an.spectrum.eigenvalues[:k])],
                                       out / "embedding_alignment.png", k=k,
                                       spectra=[an.spectrum.eigenvalues])
            figs.append("embedding_alignment.png")
            anchors = [int((y == c).nonzero()[0]) for c in range(ds.num_classes)
                       if (y == c).any()][:3]
            if len(anchors) == 3:
                g = M.plane_alignment(m64, [X[i] for i in anchors], top,
                                      resolution=min(args.resolution, 60), loss=args.loss)
                P.plot_alignment_maps([P.MapRow(ds.name, g, an.spectrum.eigenvalues[:k], note=note,
                                                anchors=[(0, 0, "x0"), (1, 0, "x1"), (0, 1, "x2")],
                                                axis_labels=("a", "b"))],
                                      out / "plane_alignment.png",
                                      title=f"plane through training inputs {anchors}")
                figs.append("plane_alignment.png")
        P.plot_spectra({"model": an.spectrum.eigenvalues}, out / "spectrum.png")
        P.plot_sample_alignment({ds.name: (an.alignments, y, note)}, out / "sample_alignment.png")
        figs += ["spectrum.png", "sample_alignment.png"]
    payload["figures"] = figs
    payload["seconds"] = time.perf_counter() - t0
    (out / "analysis.json").write_text(json.dumps(M.to_jsonable(payload), indent=1))
    g = "collapsed (" + str(an.collapse_reason) + ")" if an.G is None else f"{an.G:.4f}"
    _say(args, f"{ds.name}: p = {an.num_params}, G_{args.rule} = {g}"
               f"{' (lower bound)' if an.G_lower_bound else ''}, eps = {an.eps.eps:.4f}, "
               f"trace = {an.trace:.4g}, lambda_max = {an.lambda_max:.4g}, "
               f"|theta| = {an.param_norm:.2f}, outliers = {an.outliers.count}; "
               f"wrote {out / 'analysis.json'} ({payload['seconds']:.1f} s)")
    return 0


_DATASET_ALIASES = {"checkerboard": "checkerboard-linear", "halfmoon": "half-moon",
                    "half_moon": "half-moon", "gaussian": "gauss", "hierachical": "hierarchical"}


def _cmd_reproduce(args) -> int:
    from .boundary import experiments as E

    seeds = list(range(args.seed, args.seed + args.seeds))
    settings = _settings(args)
    datasets = [_DATASET_ALIASES.get(d, d) for d in args.datasets] if args.datasets else None
    t0 = time.perf_counter()
    if args.what == "table1":
        payload = E.table1(args.out, datasets=datasets or E.TABLE1_DATASETS, seeds=seeds,
                           settings=settings, quiet=args.quiet)
        dest = Path(args.out) / "table1"
    elif args.what == "table2":
        payload = E.table2(args.out, datasets=datasets or E.TABLE2_DATASETS, seeds=seeds,
                           settings=settings, quiet=args.quiet)
        dest = Path(args.out) / "table2"
    else:
        payload = E.figures(args.out, datasets=datasets or E.TABLE1_DATASETS, seed=args.seed,
                            settings=settings, quiet=args.quiet)
        dest = Path(args.out) / "figures"
    if "runs" in payload:
        _say(args, _summary_lines(payload["runs"]))
    _say(args, f"wrote {dest / 'report.md'} (wall time {time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hbk`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (0 on success).
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    handler = {"demo": _cmd_demo, "train": _cmd_train, "analyze": _cmd_analyze,
               "reproduce": _cmd_reproduce}[args.command]
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
