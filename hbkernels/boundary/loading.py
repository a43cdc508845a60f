"""A user's own model and data from files: any architecture, any ``(X, y)`` data set.

* **Architecture** ``"module:factory"``: an importable callable (the torchvision / timm
  convention) that builds the network, e.g. ``"mymodule:make_model"`` for a function
  ``make_model()`` in ``mymodule.py``. The current directory is put on ``sys.path`` first, so a
  file next to where ``hbk`` runs is found. Keyword arguments may follow in the form
  ``"mymodule:make_model:width=64,depth=3"`` (Python literals).
* **Model file** (:func:`load_model_file`): a ``state_dict``; a checkpoint dict holding one
  under ``"model"``, ``"state_dict"``, ``"model_state_dict"`` or ``"net"`` (other keys such as
  ``"epoch"`` are kept as metadata); a TorchScript archive (``torch.jit.save``; its weights
  are loaded into the architecture, since a ScriptModule runs neither hooks nor
  ``torch.func``); or, with
  ``allow_pickle=True`` only (it runs code from the file), a pickled ``nn.Module``. A
  state_dict needs the architecture; TorchScript and pickled modules do not.
* **Data file** (:func:`load_data_file`): a ``.pt`` (``torch.save``) or ``.npz`` file holding a
  dict with keys ``X``/``y`` (or ``x``/``y``, ``inputs``/``targets``, ``data``/``labels``)
  and optionally ``X_test``/``y_test`` (``x_test``/``y_test``), or a tuple/list ``(X, y)`` or
  ``(X, y, X_test, y_test)``. Inputs become floating tensors, labels int64 class indices.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import load_torch

__all__ = ["DataFile", "build_architecture", "load_data_file", "load_model_file"]

_SD_KEYS = ("model", "state_dict", "model_state_dict", "net", "module")
_X_KEYS = (("X", "y"), ("x", "y"), ("inputs", "targets"), ("data", "labels"), ("X_train", "y_train"),
           ("x_train", "y_train"))
_TEST_KEYS = (("X_test", "y_test"), ("x_test", "y_test"))


def _parse_kwargs(fn: str, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in part:
            raise ValueError(f"{fn}: expected factory arguments name=value, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def build_architecture(spec: str, **kwargs: Any) -> nn.Module:
    """Build a network from ``"module:factory"`` (optionally ``":k=v,k2=v2"`` arguments).

    Args:
        spec: ``"package.module:callable"``; the callable returns an ``nn.Module``.
        **kwargs: more keyword arguments for the factory.

    Raises:
        ValueError: a malformed spec, a module or attribute that does not exist, or a factory
            that does not return an ``nn.Module`` (each named).
    """
    fn = "hbk.boundary.build_architecture"
    if not isinstance(spec, str):
        raise TypeError(f"{fn}: expected an architecture 'module:factory' string, got "
                        f"{type(spec).__name__}")
    if spec.count(":") < 1:
        raise ValueError(f"{fn}: expected an architecture 'module:factory' (e.g. "
                         f"'mymodule:make_model'), got {spec!r}")
    mod_name, attr, *rest = spec.split(":", 2)
    if not mod_name or not attr:
        raise ValueError(f"{fn}: expected an architecture 'module:factory', got {spec!r}")
    kw = _parse_kwargs(fn, rest[0]) if rest else {}
    kw.update(kwargs)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{fn}: expected an importable module {mod_name!r} (on sys.path or in "
                         f"the current directory {cwd}), got {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{fn}: expected a callable {attr!r} in module {mod_name!r} "
                             f"({getattr(module, '__file__', '?')}), got no such attribute")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{fn}: expected {spec!r} to be callable, got {type(obj).__name__}")
    model = obj(**kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected {spec!r} to return an nn.Module, got "
                         f"{type(model).__name__}")
    return model


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_model_file(path: str | os.PathLike, arch: str | nn.Module | None = None, *,
                    allow_pickle: bool = False, fn: str = "hbk.boundary.load_model_file"
                    ) -> tuple[nn.Module, dict]:
    """Load a model from a state_dict, a checkpoint dict, TorchScript or a pickled module.

    Args:
        path: the file.
        arch: ``"module:factory"`` or an ``nn.Module`` instance to load a state_dict into
            (required for state_dicts and checkpoint dicts).
        allow_pickle: allow a pickled ``nn.Module`` (runs code from the file).
        fn: public name for the error messages.

    Returns:
        ``(model, meta)``; ``meta["format"]`` is ``"state_dict"``, ``"checkpoint"``,
        ``"torchscript"`` or ``"pickled module"``, plus the checkpoint's scalar entries
        (e.g. ``epoch``).
    """
    path = Path(path)
    meta: dict[str, Any] = {"path": str(path)}
    if path.is_file() and _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - torch.jit raises RuntimeError variants
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{fn}: expected a readable TorchScript file, got {path} "
                             f"({first[:200]})") from None
        meta["format"] = "torchscript"
        if arch is None:  # hooks and torch.func do not run on ScriptModules
            raise ValueError(f"{fn}: expected an architecture (--arch module:factory) to load the "
                             f"weights of the TorchScript file {path} into (a ScriptModule "
                             "supports neither forward hooks nor torch.func), got none")
        sd = {k: v for k, v in model.state_dict().items()}
        target = build_architecture(arch) if isinstance(arch, str) else arch
        _load_sd(fn, target, sd, path)
        return target, meta
    obj = load_torch(fn, path, allow_pickle=allow_pickle,
                     what="a model file (state_dict, checkpoint, TorchScript or module)")
    if isinstance(obj, nn.Module):
        meta["format"] = "pickled module"
        return obj, meta
    sd = None
    if _is_state_dict(obj):
        sd, meta["format"] = obj, "state_dict"
    elif isinstance(obj, dict):
        key = next((k for k in _SD_KEYS if _is_state_dict(obj.get(k))), None)
        if key is None and isinstance(obj.get("model"), nn.Module):
            meta["format"] = "checkpoint (module)"
            return obj["model"], meta
        if key is not None:
            sd, meta["format"] = obj[key], "checkpoint"
            meta["checkpoint_key"] = key
            for k, v in obj.items():
                if isinstance(v, (int, float, str, bool)) and k != key:
                    meta[k] = v
    if sd is None:
        what = type(obj).__name__
        if isinstance(obj, dict):
            what = f"a dict with keys {sorted(map(str, obj))[:8]}"
        raise ValueError(f"{fn}: expected a state_dict, a checkpoint dict with one of "
                         f"{list(_SD_KEYS)}, TorchScript or a pickled module in {path}, got {what}")
    if arch is None:
        raise ValueError(f"{fn}: expected an architecture (--arch module:factory) to load the "
                         f"{meta['format']} {path}, got none")
    model = build_architecture(arch) if isinstance(arch, str) else arch
    _load_sd(fn, model, sd, path)
    return model, meta


def _load_sd(fn: str, model: nn.Module, sd: dict, path: Path) -> None:
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError) as err:
        lines = [x.strip() for x in str(err).strip().splitlines()]
        raise ValueError(f"{fn}: expected weights that fit {type(model).__name__} in {path}, got "
                         f"{' '.join(lines[:3])[:300]}") from None


@dataclass
class DataFile:
    """Tensors read from a data file: ``(n, ...)`` inputs, ``(n,)`` int64 labels, optional test
    split, and the file's path."""

    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor | None
    y_test: torch.Tensor | None
    path: str

    @property
    def num_classes(self) -> int:
        ys = [self.y] + ([self.y_test] if self.y_test is not None else [])
        return int(max(int(t.max()) for t in ys if t.numel())) + 1

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X, self.y


def _tensor(fn: str, path: Path, name: str, v: Any) -> torch.Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: expected {name} to be a tensor or array in {path}, got "
                        f"{type(v).__name__}")
    return v


def _labels(fn: str, path: Path, name: str, y: torch.Tensor, n: int) -> torch.Tensor:
    if y.dim() == 2 and y.shape[1] > 1 and y.is_floating_point():
        y = y.argmax(dim=1)  # one-hot
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{fn}: expected {name} of shape ({n},) in {path}, got {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(f"{fn}: expected integer class labels {name} in {path}, got "
                             "non-integer values")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{fn}: expected integer class labels {name} in {path}, got {y.dtype}")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{fn}: expected class labels >= 0 in {path}, got {int(y.min())}")
    return y


def _pair(fn: str, path: Path, X: Any, y: Any, names: tuple[str, str]):
    X, y = _tensor(fn, path, names[0], X), _tensor(fn, path, names[1], y)
    if X.dim() == 0 or X.shape[0] == 0:
        raise ValueError(f"{fn}: expected non-empty inputs {names[0]} in {path}, got shape "
                         f"{tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.to(torch.get_default_dtype())
    if not torch.isfinite(X).all():
        raise ValueError(f"{fn}: expected finite inputs {names[0]} in {path}, got "
                         f"{int((~torch.isfinite(X)).sum())} NaN/inf entries")
    return X, _labels(fn, path, names[1], y, X.shape[0])


def load_data_file(path: str | os.PathLike, *, fn: str = "hbk.boundary.load_data_file") -> DataFile:
    """Read ``(X, y)`` (and an optional test split) from a ``.pt`` or ``.npz`` file.

    Returns:
        :class:`DataFile` (inputs floating, labels int64).

    Raises:
        FileNotFoundError, ValueError, TypeError: a missing, damaged or malformed file (named).
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{fn}: expected an existing file, got {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                obj: Any = {k: z[k] for k in z.files}
        except Exception as err:  # noqa: BLE001 - zipfile/numpy errors
            raise ValueError(f"{fn}: expected a readable .npz file, got a damaged file {path} "
                             f"({type(err).__name__}: {str(err)[:160]})") from None
    else:
        obj = load_torch(fn, path, what="a data file of (X, y)")
    test = (None, None)
    if isinstance(obj, (tuple, list)):
        if len(obj) not in (2, 4):
            raise ValueError(f"{fn}: expected a tuple (X, y) or (X, y, X_test, y_test) in {path}, "
                             f"got a {type(obj).__name__} of length {len(obj)}")
        X, y = _pair(fn, path, obj[0], obj[1], ("X", "y"))
        if len(obj) == 4:
            test = _pair(fn, path, obj[2], obj[3], ("X_test", "y_test"))
    elif isinstance(obj, dict):
        keys = next((k for k in _X_KEYS if k[0] in obj and k[1] in obj), None)
        if keys is None:
            raise ValueError(f"{fn}: expected keys X and y (or x/y, inputs/targets) in {path}, "
                             f"got {sorted(map(str, obj))[:8]}")
        X, y = _pair(fn, path, obj[keys[0]], obj[keys[1]], keys)
        tk = next((k for k in _TEST_KEYS if k[0] in obj and k[1] in obj), None)
        if tk is not None:
            test = _pair(fn, path, obj[tk[0]], obj[tk[1]], tk)
    else:
        raise TypeError(f"{fn}: expected a dict with X and y or a tuple (X, y) in {path}, got "
                         f"{type(obj).__name__}")
    if test[0] is not None and tuple(test[0].shape[1:]) != tuple(X.shape[1:]):
        raise ValueError(f"{fn}: expected test inputs of shape (m, {', '.join(map(str, X.shape[1:]))})"
                         f" in {path}, got {tuple(test[0].shape)}")
    return DataFile(X, y, test[0], test[1], str(path))
