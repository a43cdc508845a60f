"""Training loops and the paper's setups (``reference_setup.md`` section 3).

Two engines share one driver (seeded shuffles, history, checkpoints, progress bar):

* the **stacked** engine trains S fully connected nets (:class:`~.models.MLP`) at once: their
  weights are stacked into ``(S, out, in)`` tensors, the forward pass is ``baddbmm`` and the
  backward pass is written out by hand (no autograd graph), then a fused/foreach
  ``torch.optim`` optimizer updates all S models in one call. With S = 1 it is the fast path of
  :func:`train`; with S > 1 it trains several seeds for about the cost of one (the stacked
  GEMMs of one model do not depend on the others, so each model gets the same result as when
  trained alone);
* the **autograd** engine is the plain loop for any module (CNN, LeNet-5, ...).

Both index full tensors with a seeded ``torch.randperm`` each epoch (no DataLoader), keep the
reference's last partial batch, and run tiny models on one thread (restored afterwards): the
reference measured 3 ms/epoch at 1 thread against 44 ms at 2 for its 2-D models.

Setups (``SETUPS``): normal, random-label, adversarial (random-label model, then true labels),
large-norm (fresh init scaled to the random-label model's norm) and wide-margin (normal
training on checkerboard-noisy, then checkerboard-linear). With a ``cache_dir`` every finished
phase is stored under a hash of all its settings and loaded instead of retrained, so the
random-label models are trained once and reused by the adversarial and large-norm runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_bool, check_choice, check_float, check_int, check_seed, fail
from ..fileio import (
    CorruptFileError,
    DamagedFileWarning,
    atomic_torch_save,
    atomic_write_text,
    load_torch,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    store_lock,
)
from ..params import flatten_params
from .datasets import Dataset, check_dataset_name, load_dataset
from .models import MLP, check_model_data, default_model_for, load_model, model_spec, save_model

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "SETUPS",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "accuracy",
    "loss_function",
    "reference_config",
    "rescale_to_norm",
    "train",
    "train_batched",
    "train_setup",
    "train_setups",
]

LOSSES = ("ce", "nll", "mse")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SETUPS = ("normal", "random-label", "adversarial", "large-norm", "wide-margin")
ENGINES = ("auto", "stacked", "autograd")
_CACHE_VERSION = 1
_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "hbk-train-result-1"
# Steps cheaper than this many multiply-adds run on one thread (thread start-up dominates).
_ONE_THREAD_MACS = 2e7
_EVAL_CHUNK = 4096


class TrainingDivergedError(ValueError):
    """Training produced a non-finite loss or parameters (e.g. a learning rate far too large)."""


# ----------------------------------------------------------------------------------------------
# losses, accuracy


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_function(name: str, num_classes: int | None = None) -> LossFn:
    """The training loss as ``loss(outputs (n, C), targets (n,) int64) -> mean scalar``.

    ``"ce"``: cross-entropy on logits. ``"nll"``: negative log-likelihood on log-probabilities
    (pair with ``log_softmax=True`` models). ``"mse"``: mean over all n x C entries of
    ``(outputs - one_hot(targets, C))^2`` with C = ``num_classes`` or ``outputs.shape[-1]``
    (never inferred from the labels present in a batch).

    Args:
        name: ``"ce"``, ``"nll"`` or ``"mse"``.
        num_classes: for ``"mse"``, checked against ``outputs.shape[-1]`` when given.

    Returns:
        The loss callable (the form :class:`hbkernels.HessianOperator` takes).
    """
    if name == "ce":
        return F.cross_entropy
    if name == "nll":
        return F.nll_loss
    if name != "mse":
        raise ValueError(f"hbk.loss_function: expected one of {LOSSES}, got {name!r}")

    def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = outputs.shape[-1]
        if num_classes is not None and num_classes != c:
            raise ValueError(f"hbk.loss_function: expected outputs with {num_classes} classes, "
                             f"got {c}")
        return F.mse_loss(outputs, F.one_hot(targets, c).to(outputs.dtype))

    return mse


@torch.no_grad()
def _outputs(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(X[i : i + _EVAL_CHUNK]) for i in range(0, len(X), _EVAL_CHUNK)])


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``argmax model(X) == y`` (NaN for an empty set).

    Args:
        model: classifier returning ``(n, C)``.
        X: ``(n, ...)`` inputs.
        y: ``(n,)`` int64 labels.
    """
    if len(y) == 0:
        return float("nan")
    return float((_outputs(model, X).argmax(-1) == y).double().mean())


# ----------------------------------------------------------------------------------------------
# config and result


@dataclass
class TrainConfig:
    """Training hyperparameters (defaults: the reference gauss run).

    Attributes:
        epochs: passes over the training set (0 allowed: no update).
        lr: learning rate.
        batch_size: int, or ``"full"`` for full-batch steps.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
        loss: ``"ce"``, ``"nll"`` or ``"mse"`` (see :func:`loss_function`).
        momentum: SGD / RMSprop momentum.
        weight_decay: L2 weight decay (decoupled for AdamW).
        checkpoint_every: keep a state_dict at epoch 0 (the init), every multiple of this and
            at the last epoch; 0 keeps none.
        seed: seed of the shuffling generator.
        dtype: training dtype (model and inputs are cast to it).
        quiet: no progress bar.
        milestones: epochs at which the learning rate is multiplied by ``gamma`` (MultiStepLR).
        gamma: learning-rate factor at each milestone.
        log_every: history every this many epochs (None: epochs // 100, at least 1); the
            history always has epoch 0 and the last epoch.
        threads: torch threads while training; None picks 1 for small steps and leaves the
            setting alone otherwise.
        engine: ``"auto"`` (stacked for MLPs, else autograd), ``"stacked"`` or ``"autograd"``.
    """

    epochs: int = 2000
    lr: float = 0.02
    batch_size: int | str = 64
    optimizer: str = "sgd"
    loss: str = "ce"
    momentum: float = 0.0
    weight_decay: float = 0.0
    checkpoint_every: int = 0
    seed: int = 0
    dtype: torch.dtype = torch.float32
    quiet: bool = True
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    log_every: int | None = None
    threads: int | None = None
    engine: str = "auto"

    def validate(self) -> None:
        """Raise ValueError / TypeError for bad fields (every number finite and in range)."""
        fn = "hbk.TrainConfig"
        check_int(fn, "epochs", self.epochs, 0)
        check_float(fn, "lr", self.lr, 0, lo_open=True)
        if self.batch_size != "full":
            if isinstance(self.batch_size, (str, bool)) or not isinstance(self.batch_size, int):
                fail(fn, "batch_size 'full' or an int >= 1", self.batch_size,
                     ValueError if isinstance(self.batch_size, str) else TypeError)
            check_int(fn, "batch_size", self.batch_size, 1)
        check_choice(fn, "optimizer", self.optimizer, OPTIMIZERS)
        check_choice(fn, "loss", self.loss, LOSSES)
        check_float(fn, "momentum", self.momentum, 0, 1, hi_open=True)
        check_float(fn, "weight_decay", self.weight_decay, 0)
        if self.momentum and self.optimizer in ("adam", "adamw"):
            fail(fn, f"momentum only with sgd/rmsprop (optimizer {self.optimizer!r})",
                 self.momentum)
        check_int(fn, "checkpoint_every", self.checkpoint_every, 0)
        check_seed(fn, "seed", self.seed)
        if self.seed is None:
            fail(fn, "seed to be an int >= 0", None, TypeError)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            fail(fn, "dtype to be a floating torch.dtype", self.dtype, TypeError, raw=True)
        check_bool(fn, "quiet", self.quiet)
        if not isinstance(self.milestones, (tuple, list)):
            fail(fn, "milestones to be a tuple of ints", self.milestones, TypeError)
        for m in self.milestones:
            check_int(fn, "milestones entries", m, 1)
        check_float(fn, "gamma", self.gamma, 0)
        if self.log_every is not None:
            check_int(fn, "log_every", self.log_every, 1)
        if self.threads is not None:
            check_int(fn, "threads", self.threads, 1)
        check_choice(fn, "engine", self.engine, ENGINES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (dtype as its name)."""
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if isinstance(d.get("dtype"), str):
            d["dtype"] = getattr(torch, d["dtype"])
        d["milestones"] = tuple(d.get("milestones", ()))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    """A trained model and its record.

    Attributes:
        model: the trained module (trained in place by :func:`train`).
        history: ``{"epoch", "loss", "train_acc", "test_acc"}`` lists; loss is the full-batch
            training loss after that epoch; epoch 0 is the initial model.
        checkpoints: ``(epoch, state_dict)`` pairs (see ``TrainConfig.checkpoint_every``).
        train_acc: final training accuracy.
        test_acc: final test accuracy.
        seconds: wall time of the training loop (of the original run when loaded from cache).
        config: the :class:`TrainConfig`.
        val_acc: final validation accuracy (NaN for an empty split).
        train_loss: final full-batch training loss.
        info: setup metadata (setup, dataset, seed, cache key, parent run, norms).
        cached: True when loaded from the cache instead of trained.
    """

    model: nn.Module
    history: dict[str, list]
    checkpoints: list[tuple[int, dict[str, torch.Tensor]]]
    train_acc: float
    test_acc: float
    seconds: float
    config: TrainConfig = field(default_factory=TrainConfig)
    val_acc: float = float("nan")
    train_loss: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def param_norm(self) -> float:
        """Global L2 norm of the model's parameters."""
        return float(flatten_params(self.model).double().norm())

    @property
    def epochs_per_second(self) -> float:
        """Training speed of the run (NaN when no epoch ran)."""
        e = self.config.epochs
        return e / self.seconds if e and self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors; checkpoints as their epochs)."""
        spec = getattr(self.model, "spec", None)
        return _jsonable({
            "train_acc": self.train_acc,
            "test_acc": self.test_acc,
            "val_acc": self.val_acc,
            "train_loss": self.train_loss,
            "param_norm": self.param_norm,
            "seconds": self.seconds,
            "epochs_per_second": self.epochs_per_second,
            "config": self.config.to_dict(),
            "history": self.history,
            "checkpoint_epochs": [e for e, _ in self.checkpoints],
            "model": dict(spec) if isinstance(spec, dict) else type(self.model).__name__,
            "info": self.info,
            "cached": self.cached,
        })

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.pt`` (spec + state_dict), ``result.json``, if any ``checkpoints.pt``,
        and last ``manifest.json`` (the sha256 of each file) into ``directory`` (created).

        Every file is written atomically; a directory without a valid manifest is incomplete
        (:meth:`load` refuses it). Returns the directory.
        """
        d = Path(directory)
        with contextlib.suppress(FileNotFoundError):  # the old manifest no longer holds
            (d / _MANIFEST).unlink()
        files = ["model.pt"]
        save_model(self.model, d / "model.pt")
        if self.checkpoints:
            atomic_torch_save([(e, sd) for e, sd in self.checkpoints], d / "checkpoints.pt")
            files.append("checkpoints.pt")
        else:
            with contextlib.suppress(FileNotFoundError):
                (d / "checkpoints.pt").unlink()
        atomic_write_text(d / "result.json", json.dumps(self.to_dict(), indent=1))
        files.append("result.json")
        manifest = {"format": _MANIFEST_FORMAT, "key": self.info.get("key"),
                    "files": {f: sha256_file(d / f) for f in files}}
        atomic_write_text(d / _MANIFEST, json.dumps(manifest, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, *, key: str | None = None) -> TrainResult:
        """Read a directory written by :meth:`save` (``cached=True``), verified against its
        manifest (and the cache ``key`` when given).

        Raises:
            FileNotFoundError: no such directory or no ``result.json``.
            CorruptFileError: a file is missing, damaged, edited or foreign (named), or the
                manifest does not match ``key``.
        """
        fn = "hbk.TrainResult.load"
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"{fn}: expected a directory written by "
                                    f"TrainResult.save, got {d}", str(d))
        man_path = d / _MANIFEST
        if man_path.exists():
            manifest = read_json(fn, man_path)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise CorruptFileError(f"{fn}: expected a manifest, got a damaged {man_path}",
                                       man_path)
            for name, digest in manifest["files"].items():
                f = d / name
                if not f.is_file():
                    raise CorruptFileError(f"{fn}: expected {f} (listed in {man_path}), got "
                                           "no file", f)
                if sha256_file(f) != digest:
                    raise CorruptFileError(f"{fn}: expected {f} to match its sha256 in "
                                           f"{man_path}, got different content (edited, "
                                           "damaged or another run's file)", f)
            if key is not None and manifest.get("key") != key:
                raise CorruptFileError(f"{fn}: expected cache key {key[:16]}... in {man_path}, "
                                       f"got {str(manifest.get('key'))[:16]}...", man_path)
        elif key is not None:
            raise CorruptFileError(f"{fn}: expected {man_path} (written last by "
                                   "TrainResult.save), got none: an incomplete directory",
                                   man_path)
        meta = read_json(fn, d / "result.json")
        if key is not None and meta.get("info", {}).get("key") != key:
            raise CorruptFileError(f"{fn}: expected cache key {key[:16]}... in "
                                   f"{d / 'result.json'}, got another run's result", d)
        ckpt = d / "checkpoints.pt"
        checkpoints = (load_torch(fn, ckpt, what="a checkpoint list") if ckpt.exists()
                       else [])
        try:
            return cls(
                model=load_model(d / "model.pt"),
                history=meta["history"],
                checkpoints=[(int(e), sd) for e, sd in checkpoints],
                train_acc=_float(meta["train_acc"]),
                test_acc=_float(meta["test_acc"]),
                seconds=_float(meta["seconds"]),
                config=TrainConfig.from_dict(meta["config"]),
                val_acc=_float(meta["val_acc"]),
                train_loss=_float(meta["train_loss"]),
                info=meta.get("info", {}),
                cached=True,
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, CorruptFileError):
                raise
            raise CorruptFileError(f"{fn}: expected the fields of TrainResult.save in {d}, "
                                   f"got {type(err).__name__}: {err}", d) from None


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


# ----------------------------------------------------------------------------------------------
# engines


def _make_optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=True)


class _AutogradEngine:
    """One module, autograd forward/backward, torch.optim step."""

    def __init__(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig):
        self.models = [model]
        self.X, self.y = X, y
        self.loss_fn = loss_function(cfg.loss)
        self.opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)

    def step(self, idx: torch.Tensor | None) -> None:
        xb, yb = (self.X, self.y) if idx is None else (self.X[idx[0]], self.y[idx[0]])
        loss = self.loss_fn(self.models[0](xb), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[list, list]:
        if len(y) == 0:
            return [float("nan")], [float("nan")]
        out = _outputs(self.models[0], X)
        return [float(self.loss_fn(out, y))], [float((out.argmax(-1) == y).double().mean())]

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in self.models[0].state_dict().items()}]

    def finish(self) -> None:
        pass

    def macs_per_sample(self) -> float:
        return _count_macs(self.models[0], self.X[:1])


def _count_macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of Linear and Conv layers for one input (forward hooks)."""
    total = [0.0]

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features
        elif isinstance(mod, nn.modules.conv._ConvNd):
            k = math.prod(mod.kernel_size) * mod.in_channels / mod.groups
            total[0] += out[0].numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


class _StackedEngine:
    """S structurally identical MLPs; stacked weights, hand-written backward, one optimizer."""

    def __init__(self, models: list[MLP], X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 num_classes: int):
        self.models = models
        self.S = len(models)
        self.loss = cfg.loss
        self.loss_fn = loss_function(cfg.loss)
        self.log_softmax = models[0].log_softmax
        self.activation = models[0].activation
        self.C = num_classes
        self.X = X.reshape(len(X), -1)
        self.y = y
        self.onehot = F.one_hot(y, num_classes).to(cfg.dtype)
        self.Xs = self.X.expand(self.S, *self.X.shape)
        self.Ts = self.onehot.expand(self.S, *self.onehot.shape)
        per_model = [m.linears() for m in models]
        self.W, self.b = [], []
        with torch.no_grad():
            for layer in range(len(per_model[0])):
                self.W.append(torch.stack([ls[layer].weight for ls in per_model]).to(cfg.dtype))
                self.b.append(torch.stack([ls[layer].bias for ls in per_model])
                              .to(cfg.dtype).unsqueeze(1))
        self.params = [t for pair in zip(self.W, self.b) for t in pair]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = _make_optimizer(self.params, cfg)
        # Plain SGD is one foreach update (the optimizer's step costs ~30 us of Python here).
        self.plain_sgd = cfg.optimizer == "sgd" and not cfg.momentum and not cfg.weight_decay
        self.grads = [p.grad for p in self.params]

    def _act_(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return z.clamp_min_(0)
        return z.sigmoid_() if self.activation == "sigmoid" else z.tanh_()

    def _act_grad_(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":  # one fused op: g where a > 0, else 0
            return torch.ops.aten.threshold_backward(g, a, 0)
        if self.activation == "sigmoid":
            return g.mul_(a * (1 - a))
        return g.mul_(1 - a * a)

    def _forward(self, a: torch.Tensor, keep: list | None) -> torch.Tensor:
        last = len(self.W) - 1
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = torch.baddbmm(b, a, W.transpose(1, 2))
            if i < last:
                a = self._act_(z)
                if keep is not None:
                    keep.append(a)
        return torch.log_softmax(z, -1) if self.log_softmax else z

    @torch.no_grad()
    def step(self, idx: torch.Tensor | None) -> None:
        a0, t = (self.Xs, self.Ts) if idx is None else (self.X[idx], self.onehot[idx])
        acts = [a0]
        out = self._forward(a0, acts)
        # d(mean loss)/d(outputs), each model over its own batch
        if self.loss == "ce":
            g = torch.softmax(out, -1).sub_(t)
        elif self.loss == "nll":
            g = t.neg()
        else:
            g = (out - t).mul_(2.0 / self.C)
        g.div_(a0.shape[1])
        if self.log_softmax:
            g = g - out.exp() * g.sum(-1, keepdim=True)
        for i in range(len(self.W) - 1, -1, -1):
            torch.bmm(g.transpose(1, 2), acts[i], out=self.W[i].grad)
            torch.sum(g, dim=1, keepdim=True, out=self.b[i].grad)
            if i > 0:
                g = self._act_grad_(torch.bmm(g, self.W[i]), acts[i])
        if self.plain_sgd:
            torch._foreach_add_(self.params, self.grads, alpha=-self.opt.param_groups[0]["lr"])
        else:
            self.opt.step()

    @torch.no_grad()
    def evaluate(self, X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[list, list]:
        if len(y) == 0:
            return [float("nan")] * self.S, [float("nan")] * self.S
        Xf = X.reshape(len(X), -1).to(cfg.dtype)
        out = self._forward(Xf.expand(self.S, *Xf.shape), None)
        losses = [float(self.loss_fn(out[s], y)) for s in range(self.S)]
        accs = (out.argmax(-1) == y).double().mean(1).tolist()
        return losses, accs

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for s in range(self.S):
            sd = {}
            for i, (W, b) in enumerate(zip(self.W, self.b), start=1):
                sd[f"fc{i}.weight"] = W[s].clone()
                sd[f"fc{i}.bias"] = b[s, 0].clone()
            out.append(sd)
        return out

    @torch.no_grad()
    def finish(self) -> None:
        for s, model in enumerate(self.models):
            for layer, W, b in zip(model.linears(), self.W, self.b):
                layer.weight.copy_(W[s])
                layer.bias.copy_(b[s, 0])

    def macs_per_sample(self) -> float:
        return float(sum(W[0].numel() for W in self.W))


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _stackable(models: Sequence[nn.Module]) -> bool:
    first = models[0]
    return all(
        isinstance(m, MLP) and type(m) is type(first) and m.sizes == first.sizes
        and m.activation == first.activation and m.log_softmax == first.log_softmax
        and all(p.requires_grad for p in m.parameters())
        for m in models
    )


def _fit(models: list[nn.Module], dataset: Dataset, cfg: TrainConfig, seeds: list[int],
         desc: str = "train") -> list[TrainResult]:
    """Train ``models`` (stacked when possible), each with its own shuffle seed."""
    if not isinstance(cfg, TrainConfig):
        fail("hbk.train", "config to be a TrainConfig", cfg, TypeError)
    cfg.validate()
    if not isinstance(dataset, Dataset):
        raise TypeError(f"hbk.train: expected a Dataset, got {type(dataset).__name__}")
    X, y = dataset.X_train.to(cfg.dtype), dataset.y_train
    n = len(y)
    if n == 0:
        raise ValueError("hbk.train: expected a non-empty training set, got 0 samples")
    bad = int((~torch.isfinite(X)).sum())
    if bad:
        raise ValueError(f"hbk.train: expected finite training inputs, got {bad} NaN/inf "
                         f"entries in {dataset.name}")
    for m in models:
        if not isinstance(m, nn.Module):
            fail("hbk.train", "model to be an nn.Module", m, TypeError)
        m.to(cfg.dtype)
        check_model_data("hbk.train", m, dataset.to(cfg.dtype))
    if cfg.engine == "stacked" and not _stackable(models):
        raise ValueError("hbk.train: expected identical MLP models (FNN / FNN2Layer) for "
                         f"engine='stacked', got {sorted({type(m).__name__ for m in models})}")
    if cfg.engine != "autograd" and _stackable(models):
        stacked = _StackedEngine(models, X, y, cfg, dataset.num_classes)  # type: ignore[arg-type]
        groups: list[tuple[Any, list[int]]] = [(stacked, seeds)]
    else:
        groups = [(_AutogradEngine(m, X, y, cfg), [s]) for m, s in zip(models, seeds)]

    results: list[TrainResult] = []
    for engine, group_seeds in groups:
        results.extend(_run(engine, dataset, cfg, group_seeds, desc))
    return results


def _run(engine: Any, dataset: Dataset, cfg: TrainConfig, seeds: list[int],
         desc: str) -> list[TrainResult]:
    X, y = dataset.X_train.to(cfg.dtype), dataset.y_train
    Xt, yt = dataset.X_test.to(cfg.dtype), dataset.y_test
    n, S, E = len(y), len(seeds), cfg.epochs
    bs = n if cfg.batch_size == "full" else min(int(cfg.batch_size), n)
    log_every = cfg.log_every or max(1, E // 100)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    history = [{"epoch": [], "loss": [], "train_acc": [], "test_acc": []} for _ in range(S)]
    checkpoints: list[list] = [[] for _ in range(S)]
    threads = cfg.threads
    if threads is None and engine.macs_per_sample() * bs * S < _ONE_THREAD_MACS:
        threads = 1

    def log(epoch: int) -> None:
        losses, accs = engine.evaluate(X, y, cfg)
        _check_finite(losses, epoch)
        _, taccs = engine.evaluate(Xt, yt, cfg)
        for s in range(S):
            h = history[s]
            h["epoch"].append(epoch)
            h["loss"].append(losses[s])
            h["train_acc"].append(accs[s])
            h["test_acc"].append(taccs[s])

    def _check_finite(losses: list[float], epoch: int) -> None:
        bad = [seeds[s] for s, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise TrainingDivergedError(
                f"hbk.train: expected a finite training loss, got {losses[seeds.index(bad[0])]} "
                f"at epoch {epoch} of {E} (seed{'s' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))}; lr {cfg.lr:g}, optimizer {cfg.optimizer}): "
                "training diverged and nothing was saved; try a smaller learning rate")

    def checkpoint(epoch: int) -> None:
        for s, sd in enumerate(engine.state_dicts()):
            checkpoints[s].append((epoch, sd))

    with _num_threads(threads):
        log(0)
        if cfg.checkpoint_every:
            checkpoint(0)
        bar = tqdm(total=E, desc=desc, disable=cfg.quiet, leave=False, mininterval=0.5)
        start = time.perf_counter()
        for epoch in range(1, E + 1):
            if bs >= n:
                engine.step(None)
            else:
                perm = torch.stack([torch.randperm(n, generator=g) for g in gens])
                for i in range(0, n, bs):
                    engine.step(perm[:, i : i + bs])
            if epoch in cfg.milestones:  # MultiStepLR: lr * gamma^(milestones passed)
                for group in engine.opt.param_groups:
                    group["lr"] *= cfg.gamma
            if epoch % log_every == 0 or epoch == E:
                log(epoch)
                bar.set_postfix(loss=f"{history[0]['loss'][-1]:.3g}",
                                acc=f"{history[0]['train_acc'][-1]:.3f}", refresh=False)
            if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == E):
                checkpoint(epoch)
            bar.update(1)
        seconds = time.perf_counter() - start
        bar.close()
        engine.finish()
        for s, model in enumerate(engine.models):
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise TrainingDivergedError(
                    f"hbk.train: expected finite parameters after training, got non-finite "
                    f"values (seed {seeds[s]}; lr {cfg.lr:g}): training diverged and nothing "
                    "was saved; try a smaller learning rate")
        _, vaccs = engine.evaluate(dataset.X_val.to(cfg.dtype), dataset.y_val, cfg)

    out = []
    for s in range(S):
        h = history[s]
        out.append(TrainResult(
            model=engine.models[s], history=h, checkpoints=checkpoints[s],
            train_acc=h["train_acc"][-1], test_acc=h["test_acc"][-1], seconds=seconds,
            config=replace(cfg, seed=int(seeds[s])), val_acc=vaccs[s], train_loss=h["loss"][-1],
            info={"dataset": dataset.name, "random_labels": dataset.random_labels,
                  "engine": type(engine).__name__.strip("_").replace("Engine", "").lower(),
                  "models_trained_together": S},
        ))
    return out


def train(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset``'s training split.

    Each epoch draws ``torch.randperm`` from a generator seeded ``config.seed`` (the same
    generator across epochs) and steps through it in batches, the last one partial; the same
    seed and initial model give the same result. MLPs use the stacked engine (hand-written
    backward), other modules autograd.

    Args:
        model: the classifier (cast to ``config.dtype``).
        dataset: a :class:`~hbkernels.boundary.datasets.Dataset`.
        config: hyperparameters (default :class:`TrainConfig`).

    Returns:
        :class:`TrainResult` with ``result.model is model``.
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        fail("hbk.train", "config to be a TrainConfig", cfg, TypeError)
    return _fit([model], dataset, cfg, [cfg.seed])[0]


def train_batched(models: Sequence[nn.Module], dataset: Dataset,
                  config: TrainConfig | None = None,
                  seeds: Sequence[int] | None = None) -> list[TrainResult]:
    """Train several models at once (different inits and shuffle seeds, same hyperparameters).

    Identical MLPs are stacked and trained together for about the cost of one; each gets the
    result it would get from :func:`train` with ``config.seed = seeds[i]``. Other modules are
    trained one after the other.

    Args:
        models: S models (trained in place).
        dataset: the data.
        config: shared hyperparameters.
        seeds: S shuffle seeds (default ``config.seed + i``).

    Returns:
        S :class:`TrainResult`.
    """
    cfg = TrainConfig() if config is None else config
    if not isinstance(cfg, TrainConfig):
        fail("hbk.train_batched", "config to be a TrainConfig", cfg, TypeError)
    models = list(models)
    if not models:
        raise ValueError("hbk.train_batched: expected at least one model, got none")
    seeds = [cfg.seed + i for i in range(len(models))] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(models):
        raise ValueError(f"hbk.train_batched: expected {len(models)} seeds, got {len(seeds)}")
    return _fit(models, dataset, cfg, seeds)


# ----------------------------------------------------------------------------------------------
# the paper's setups


_SYNTHETIC_EPOCHS = {  # normal, random-label, adversarial, large-norm (reference configs)
    "gauss": (2000, 300_000, 20_000, 1000),
    "hierarchical": (2000, 300_000, 20_000, 20_000),
    "hierarchical-2": (2000, 300_000, 20_000, 20_000),
    "circle": (2000, 20_000, 20_000, 5000),
    "half-moon": (2000, 100_000, 20_000, 5000),
    "checkerboard-linear": (2000, 300_000, 20_000, 1000),
    "checkerboard-noisy": (2000, 300_000, 20_000, 1000),
}


def reference_config(dataset_name: str, setup: str, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32, quiet: bool = True) -> TrainConfig:
    """The reference hyperparameters of one training phase (``reference_setup.md`` 3.3).

    2-D data: SGD lr 0.02, batch 64; epochs normal 2,000, random-label 300k (circle 20k,
    half-moon 100k), adversarial 20k, large-norm 1k (circle / half-moon 5k, hierarchical 20k),
    wide-margin fine-tune 2,000. Intro: SGD 0.002, full batch, 45k. Iris: SGD 0.01, full
    batch, 1k / 200k / 1k. MNIST-style subsets (and the digits stand-ins): SGD 0.02, batch 64,
    500 / 5k (017; others 10k) / 1.5k (179: 500). 10-class MNIST / digits: normal SGD 0.01 batch
    32 for 200, random-label 1k and adversarial 2k at 0.02 / 64. CIFAR-10 (LeNet-5): the
    reference schedules with momentum, weight decay and milestones. Where the reference has no
    config (large-norm outside gauss / circle / half-moon / hierarchical, all intro phases but
    normal) the closest one is used: the adversarial (images) or normal (intro, iris) schedule,
    gauss's 1k epochs for the checkerboards.

    Args:
        dataset_name: a :func:`~hbkernels.boundary.datasets.load_dataset` name.
        setup: one of ``SETUPS``.
        seed: shuffle seed.
        dtype: training dtype.
        quiet: no progress bar.

    Returns:
        The :class:`TrainConfig`.
    """
    check_choice("hbk.reference_config", "setup", setup, SETUPS)
    check_dataset_name("hbk.reference_config", dataset_name)
    if setup == "wide-margin" and dataset_name != "checkerboard-linear":
        raise ValueError("hbk.reference_config: expected 'checkerboard-linear' for wide-margin "
                         f"(pretrained on checkerboard-noisy), got {dataset_name!r}")
    phase = SETUPS.index(setup)
    family, _, spec = dataset_name.partition("-")
    base = {"seed": seed, "dtype": dtype, "quiet": quiet}
    if dataset_name in _SYNTHETIC_EPOCHS:
        epochs = 2000 if setup == "wide-margin" else _SYNTHETIC_EPOCHS[dataset_name][phase]
        return TrainConfig(epochs=epochs, lr=0.02, batch_size=64, **base)
    if dataset_name == "intro":
        return TrainConfig(epochs=45_000, lr=0.002, batch_size="full", **base)
    if dataset_name == "iris":
        return TrainConfig(epochs=(1000, 200_000, 1000, 1000)[phase], lr=0.01,
                           batch_size="full", **base)
    if family in ("digits", "mnist"):
        if not spec or len(spec) == 10:
            if setup == "normal":
                return TrainConfig(epochs=200, lr=0.01, batch_size=32, **base)
            return TrainConfig(epochs=(200, 1000, 2000, 2000)[phase], lr=0.02, batch_size=64,
                               **base)
        adversarial = 500 if spec == "179" else 1500
        epochs = (500, 5000 if spec == "017" else 10_000, adversarial, adversarial)[phase]
        return TrainConfig(epochs=epochs, lr=0.02, batch_size=64, **base)
    if family == "cifar":
        if not spec or len(spec) == 10:
            if setup == "normal":
                return TrainConfig(epochs=307, lr=0.1, batch_size=128, momentum=0.9,
                                   weight_decay=5e-4, milestones=(76, 153, 230), **base)
            if setup == "random-label":
                return TrainConfig(epochs=307, lr=0.1, batch_size=128,
                                   milestones=(76, 153, 230), **base)
            return TrainConfig(epochs=150, lr=0.01, batch_size=64, milestones=(76, 153), **base)
        if setup == "normal":
            return TrainConfig(epochs=100, lr=0.005, batch_size=32, weight_decay=0.1, **base)
        if setup == "random-label":
            return TrainConfig(epochs=100, lr=0.01, batch_size=32, **base)
        return TrainConfig(epochs=100, lr=0.005, batch_size=64, **base)
    raise ValueError(f"hbk.reference_config: expected a known dataset name, got {dataset_name!r}")


def rescale_to_norm(model: nn.Module, target_norm: float) -> float:
    """Multiply every parameter tensor by ``target_norm / ||theta||`` (the large-norm init).

    Args:
        model: module, changed in place.
        target_norm: the wanted global L2 norm (> 0).

    Returns:
        The factor ``n1 / n0`` applied.
    """
    fn = "hbk.rescale_to_norm"
    if not isinstance(model, nn.Module):
        fail(fn, "model to be an nn.Module", model, TypeError)
    target_norm = check_float(fn, "target_norm", target_norm, 0, lo_open=True)
    n0 = float(flatten_params(model).double().norm())
    if not (math.isfinite(n0) and n0 > 0):
        fail(fn, "a model with a finite, positive parameter norm", f"norm {n0!r}", raw=True)
    factor = target_norm / n0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return factor


@dataclass
class _Plan:
    """Resolved settings of a setup run shared by all its phases."""

    width: int | tuple | None
    epochs: dict[str, int]
    cache_dir: Path | None
    quiet: bool
    dtype: torch.dtype
    random_type: str
    root: str | None
    checkpoint_every: int
    _data: dict = field(default_factory=dict)

    def dataset(self, name: str, random_labels: bool) -> Dataset:
        key = (name, random_labels)
        if key not in self._data:
            self._data[key] = load_dataset(
                name, random_labels=random_labels, root=self.root, dtype=self.dtype,
                random_type=self.random_type if random_labels else "uniform")
        return self._data[key]

    def config(self, setup: str, dataset_name: str, top: bool) -> TrainConfig:
        cfg = reference_config(dataset_name, setup, dtype=self.dtype, quiet=self.quiet)
        if setup in self.epochs:
            cfg = replace(cfg, epochs=int(self.epochs[setup]))
        if top and self.checkpoint_every:
            cfg = replace(cfg, checkpoint_every=self.checkpoint_every)
        return cfg


def _phase_inputs(setup: str, dataset_name: str) -> tuple[str, str | None, str | None]:
    """(data name of this phase, parent setup, parent data name)."""
    if setup in ("adversarial", "large-norm"):
        return dataset_name, "random-label", dataset_name
    if setup == "wide-margin":
        return dataset_name, "normal", "checkerboard-noisy"
    return dataset_name, None, None


def _phase_key(setup: str, dataset_name: str, seed: int, plan: _Plan,
               top: bool) -> tuple[str, dict]:
    data_name, parent_setup, parent_data = _phase_inputs(setup, dataset_name)
    ds = plan.dataset(data_name, setup == "random-label")
    model = default_model_for(ds, plan.width, dtype=plan.dtype)
    spec = model_spec(model)
    spec.pop("seed")
    cfg = plan.config(setup, dataset_name, top).to_dict()
    # Bookkeeping that does not change the trained weights stays out of the key; a cached
    # run is reused for checkpoints only when it kept them at the same spacing.
    for k in ("quiet", "threads", "engine", "log_every", "seed", "checkpoint_every"):
        cfg.pop(k)
    settings = {
        "version": _CACHE_VERSION, "setup": setup, "dataset": dataset_name, "seed": seed,
        "model": spec, "config": cfg,
        "random_type": plan.random_type if setup == "random-label" else None,
        "parent": (_phase_key(parent_setup, parent_data, seed, plan, False)[0]
                   if parent_setup else None),
    }
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest(), settings


def _cache_path(plan: _Plan, setup: str, dataset_name: str, seed: int, key: str) -> Path | None:
    if plan.cache_dir is None:
        return None
    return plan.cache_dir / f"{dataset_name}--{setup}--seed{seed}--{key[:16]}"


def _store(result: TrainResult, path: Path) -> None:
    """Write a finished phase into the cache: a fresh temporary directory, then one rename
    under the cache lock (the entry is complete or absent; concurrent writers are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)  # left by a killed writer
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name[:40]}-", dir=path.parent))
    try:
        result.save(tmp)
        with store_lock(path.parent):
            if path.exists():  # an older or damaged entry of the same key
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path, key: str) -> TrainResult | None:
    """The cached phase at ``path`` if it verifies, else None (a damaged entry is named)."""
    if not path.exists():
        return None
    try:
        with store_lock(path.parent, shared=True):
            return TrainResult.load(path, key=key)
    except (CorruptFileError, FileNotFoundError, RuntimeError) as err:
        warnings.warn(f"hbk: the cached model {path} is damaged or foreign and is retrained: "
                      f"{err}", DamagedFileWarning, stacklevel=3)
        return None


def _run_phase(setup: str, dataset_name: str, seeds: list[int], plan: _Plan,
               top: bool) -> list[TrainResult]:
    keys = {s: _phase_key(setup, dataset_name, s, plan, top) for s in seeds}
    cfg = plan.config(setup, dataset_name, top)
    results: dict[int, TrainResult] = {}
    for s in seeds:
        path = _cache_path(plan, setup, dataset_name, s, keys[s][0])
        hit = _load_cached(path, keys[s][0]) if path is not None else None
        if hit is not None and cfg.checkpoint_every in (0, hit.config.checkpoint_every):
            results[s] = hit
    todo = [s for s in seeds if s not in results]
    if todo:
        data_name, parent_setup, parent_data = _phase_inputs(setup, dataset_name)
        ds = plan.dataset(data_name, setup == "random-label")
        models = [default_model_for(ds, plan.width, seed=s, dtype=plan.dtype) for s in todo]
        infos: list[dict[str, Any]] = [{} for _ in todo]
        if parent_setup is not None:
            parents = _run_phase(parent_setup, parent_data,  # type: ignore[arg-type]
                                 todo, plan, False)
            for model, parent, info in zip(models, parents, infos):
                info["parent"] = {"setup": parent_setup, "dataset": parent_data,
                                  "key": parent.info.get("key"), "train_acc": parent.train_acc,
                                  "test_acc": parent.test_acc, "param_norm": parent.param_norm,
                                  "epochs": parent.config.epochs}
                if setup == "large-norm":
                    info["init_norm"] = float(flatten_params(model).double().norm())
                    info["scale"] = rescale_to_norm(model, parent.param_norm)
                else:
                    model.load_state_dict(parent.model.state_dict())
        desc = f"{dataset_name} {setup} seed{'s' if len(todo) > 1 else ''} {','.join(map(str, todo))}"
        trained = _fit(models, ds, cfg, todo, desc)
        for s, res, info in zip(todo, trained, infos):
            res.info.update(info)
            res.info.update({"setup": setup, "dataset": dataset_name, "seed": s,
                             "key": keys[s][0], "settings": keys[s][1]})
            path = _cache_path(plan, setup, dataset_name, s, keys[s][0])
            if path is not None:
                _store(res, path)
            results[s] = res
    return [results[s] for s in seeds]


def train_setups(
    setup: str,
    dataset_name: str,
    seeds: Sequence[int],
    *,
    width: int | tuple[int, int] | None = None,
    epochs: dict[str, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = True,
    dtype: torch.dtype = torch.float32,
    random_type: str = "uniform",
    root: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> list[TrainResult]:
    """:func:`train_setup` for several seeds, trained together where the model allows it.

    MLP models of all seeds that are not in the cache train in one stacked run per phase (the
    random-label phase of an adversarial run included); each seed's model is the one
    :func:`train_setup` gives for that seed.

    Returns:
        One :class:`TrainResult` per seed, in order.
    """
    fn = "hbk.train_setup"
    check_choice(fn, "setup", setup, SETUPS)
    check_dataset_name(fn, dataset_name)
    if setup == "wide-margin" and dataset_name != "checkerboard-linear":
        raise ValueError("hbk.train_setup: expected dataset 'checkerboard-linear' for "
                         f"wide-margin, got {dataset_name!r}")
    if epochs is not None and not isinstance(epochs, dict):
        fail(fn, "epochs to be a dict {setup: epochs}", epochs, TypeError)
    epochs = dict(epochs or {})
    unknown = set(epochs) - set(SETUPS)
    if unknown:
        raise ValueError(f"hbk.train_setup: expected epochs keys in {SETUPS}, got "
                         f"{sorted(unknown)}")
    for k, v in epochs.items():
        check_int(fn, f"epochs[{k!r}]", v, 0)
    check_int(fn, "checkpoint_every", checkpoint_every, 0)
    check_bool(fn, "quiet", quiet)
    check_choice(fn, "random_type", random_type, ("uniform", "within"))
    if width is not None:
        for w in (width if isinstance(width, (tuple, list)) else [width]):
            check_int(fn, "width", w, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        fail(fn, "dtype to be a floating torch.dtype", dtype, TypeError, raw=True)
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence):
        fail(fn, "seeds to be a sequence of ints", seeds, TypeError)
    seeds = [check_int(fn, "seed", s, 0) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"hbk.train_setup: expected distinct seeds, got {seeds}")
    plan = _Plan(width=width, epochs=epochs,
                 cache_dir=Path(cache_dir) if cache_dir is not None else None, quiet=quiet,
                 dtype=dtype, random_type=random_type,
                 root=str(root) if root is not None else None,
                 checkpoint_every=checkpoint_every)
    return _run_phase(setup, dataset_name, seeds, plan, True)


def train_setup(
    setup: str,
    dataset_name: str,
    *,
    seed: int,
    width: int | tuple[int, int] | None = None,
    epochs: dict[str, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = True,
    dtype: torch.dtype = torch.float32,
    random_type: str = "uniform",
    root: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train one of the paper's setups with the reference model and hyperparameters.

    * ``normal``: fresh init (``seed``), true labels.
    * ``random-label``: fresh init, labels permuted (``random_type``), the long schedule.
    * ``adversarial``: the random-label model of the same seed (trained or taken from the
      cache), then true labels.
    * ``large-norm``: the fresh init of ``seed`` with every parameter tensor multiplied by
      ``||theta_random-label|| / ||theta_init||``, then true labels.
    * ``wide-margin`` (``checkerboard-linear`` only): the ``normal`` model of
      ``checkerboard-noisy``, then ``checkerboard-linear``.

    ``seed`` seeds the initialisation and the shuffles of every phase. Results record the
    parent run in ``info["parent"]`` (and ``info["scale"]`` for large-norm).

    Args:
        setup: one of ``SETUPS``.
        dataset_name: dataset of the final phase.
        seed: run seed.
        width: hidden width for fnn/fnn2 models (None: the reference width).
        epochs: per-phase epoch overrides, keys from ``SETUPS`` (a wide-margin pretraining is
            a ``normal`` phase).
        cache_dir: directory of finished phases (None: no cache). Keys hash the setup,
            dataset, seed, model, hyperparameters, dtype and the parent's key.
        quiet: no progress bars.
        dtype: training dtype.
        random_type: ``"uniform"`` or ``"within"`` (hierarchical) labels of the random-label
            phase.
        root: directory of MNIST / CIFAR files.
        checkpoint_every: state_dict snapshots of the final phase (see :class:`TrainConfig`).

    Returns:
        The :class:`TrainResult` of the final phase.
    """
    return train_setups(setup, dataset_name, [seed], width=width, epochs=epochs,
                        cache_dir=cache_dir, quiet=quiet, dtype=dtype, random_type=random_type,
                        root=root, checkpoint_every=checkpoint_every)[0]
