"""One result convention: every result is a dataclass that saves to JSON (+ tensors) and loads back.

* ``to_dict()``: a JSON-compatible dict of the fields, tensors as nested lists, non-finite
  floats as ``null`` (JSON has no NaN/inf) -- for reports and quick looks.
* ``save(path)``: ``path`` (``.json``) holds the scalars and the structure; every tensor or
  array field goes, exactly and compactly, into ``path`` with suffix ``.pt`` beside it. Both
  are written atomically. ``Result.load(path)`` (or :func:`load_result`) rebuilds the object,
  nested results included; a ``null`` where a float belongs loads as NaN.

Subclasses register themselves by class name, so :func:`load_result` can rebuild any of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from typing_extensions import Self

from .fileio import atomic_torch_save, atomic_write_text

__all__ = ["Result", "load_result", "save_json", "to_jsonable"]

_FORMAT = "hbkernels-result-1"
_REGISTRY: dict[str, type[Result]] = {}
R = TypeVar("R", bound="Result")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values for tensors, arrays, numbers, dtypes, paths, dataclasses and results.

    Non-finite floats become ``None``; tensors and arrays become nested lists.
    """
    if isinstance(obj, Result):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    return obj


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``to_jsonable(obj)`` to ``path`` atomically (strict JSON: no NaN tokens)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, allow_nan=False))


# ----------------------------------------------------------------------------- encoding
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON structure for ``obj``; tensors are moved into ``tensors`` and referenced by key."""
    if isinstance(obj, Result):
        fields = {f.name: _encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}
        return {"__result__": type(obj).__name__, "fields": fields}
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
        return {k: _encode(v, tensors) for k, v in obj.items()}
    return to_jsonable(obj)  # scalars, strings, plain dataclasses


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise ValueError(f"hbk.load_result: expected tensor {key!r} in {where.with_suffix('.pt')}, "
                             "got a file without it (the two files do not belong together)")
        return tensors[key]
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    if "__result__" in obj:
        name = obj["__result__"]
        cls = _REGISTRY.get(name)
        if cls is None:
            raise ValueError(f"hbk.load_result: expected a known result type in {where}, got {name!r} "
                             f"(known: {sorted(_REGISTRY)}; import the module that defines it first)")
        fields = {k: _decode(v, tensors, where) for k, v in obj["fields"].items()}
        return cls._from_fields(fields)
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


class Result:
    """Base of every result dataclass: ``to_dict``, ``save`` and ``load`` with one convention."""

    _tensor_suffix: ClassVar[str] = ".pt"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict:
        """JSON-compatible dict of all fields (tensors as lists, non-finite floats as null)."""
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path`` (JSON) and its tensors to ``path.with_suffix('.pt')``.

        Returns:
            The JSON path. Both files are written atomically; the tensor file is written first,
            so a JSON file on disk always has its tensors beside it.
        """
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        body = _encode(self, tensors)
        doc = {"format": _FORMAT, "type": type(self).__name__, "result": body,
               "tensors": path.with_suffix(self._tensor_suffix).name if tensors else None,
               "summary": to_jsonable(self.to_dict()) if not tensors else None}
        if tensors:
            atomic_torch_save(tensors, path.with_suffix(self._tensor_suffix))
        atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Rebuild a result saved by :meth:`save`; raises ValueError naming the file if it is
        damaged, of another type, or its tensor file is missing."""
        out = load_result(path)
        if not isinstance(out, cls):
            raise ValueError(f"hbk.{cls.__name__}.load: expected a saved {cls.__name__} in {path}, "
                             f"got a {type(out).__name__}")
        return out

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Self:
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs, late = {}, {}
        for name, value in fields.items():
            if name not in known:
                continue  # a field dropped since the file was written
            if value is None and "float" in str(known[name].type) and "None" not in str(known[name].type):
                value = math.nan  # non-finite floats are stored as null
            (kwargs if known[name].init else late)[name] = value
        obj = cls(**kwargs)
        for name, value in late.items():
            setattr(obj, name, value)
        return obj


def load_result(path: str | Path) -> Result:
    """Load any result saved by :meth:`Result.save` (its type is recorded in the file)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"hbk.load_result: expected a saved result at {path}, got no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"hbk.load_result: expected a saved result in {path}, got a damaged file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or "result" not in doc:
        raise ValueError(f"hbk.load_result: expected a file written by Result.save in {path}, "
                         "got another JSON document")
    tensors: dict[str, torch.Tensor] = {}
    if doc.get("tensors"):
        tpath = path.parent / doc["tensors"]
        try:
            tensors = torch.load(tpath, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"hbk.load_result: expected the tensor file {tpath} beside {path}, "
                                    "got no such file") from None
        except Exception as err:  # torch raises several types for damaged archives
            raise ValueError(f"hbk.load_result: expected a readable tensor file {tpath}, got a damaged "
                             f"file ({type(err).__name__}: {err})") from None
    return _decode(doc["result"], tensors, path)
