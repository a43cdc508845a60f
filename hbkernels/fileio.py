"""Files we write and read: atomic writes, content hashes, a store lock, safe loads.

* Writes go to a unique temporary in the target directory, are fsynced, then renamed over
  the target (and the directory is fsynced): a reader never sees a half-written file, two
  writers never share a temporary name, and an interrupted write leaves the old file (or
  none), never a truncated one. Disk full and permission errors are re-raised as ``OSError``
  subclasses whose message names the path and the cause.
* :func:`sha256_file` / :func:`sha256_bytes` hash artefacts for the manifests of the run
  store and the model cache; :class:`CorruptFileError` names a damaged or foreign file.
* :func:`store_lock` serialises writers (and readers) of one store across processes.
* :func:`load_torch` loads a ``torch.save`` file weights-only and says whether a failure is
  a damaged file or a pickled object that needs full unpickling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickletools
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptFileError",
    "DamagedFileWarning",
    "PickleNeededError",
    "atomic_savefig",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "load_torch",
    "read_json",
    "remove_stale_temporaries",
    "sha256_bytes",
    "sha256_file",
    "store_lock",
]


class CorruptFileError(ValueError):
    """A file that exists but is damaged, truncated, foreign or not what was expected.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = str(path)


class PickleNeededError(ValueError):
    """A valid file whose pickled objects can only be loaded by running code from it."""


class DamagedFileWarning(UserWarning):
    """A stored artefact failed its check (hash, key, format) and is recomputed."""


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    if err.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "read-only file system"
    return err.strerror or str(err)


def _explain(path: Path, err: OSError) -> OSError:
    out = type(err)(err.errno, f"hbk: could not write {path}: {_why(err)}")
    out.filename = str(path)
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created). Returns the path.

    Raises:
        OSError: (same subclass and errno as the cause) naming ``path`` and the cause, e.g.
            "the disk is full"; the target is then unchanged and no temporary is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _explain(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # also KeyboardInterrupt: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _explain(path, err) from err
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then an atomic write (never a half-written ``.pt``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` into memory (format from the suffix), then an atomic write."""
    path = Path(path)
    buf = io.BytesIO()
    fmt = kwargs.pop("format", None) or (path.suffix.lstrip(".") or "png")
    fig.savefig(buf, format=fmt, **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def check_writable(fn: str, path: str | os.PathLike, directory: bool = True) -> Path:
    """Before long work: create ``path`` (a directory, or a file's parent) and prove a file can be
    written there; raise ``OSError`` naming ``fn``, the path and the cause otherwise."""
    path = Path(path)
    target = path if directory else path.parent
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{fn}: expected a writable directory, got "
                                 f"{target} (an existing file)")
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".hbk-write-test.")
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        out = type(err)(err.errno, f"{fn}: expected a writable location, got {target} "
                                   f"({_why(err)})")
        out.filename = str(target)
        raise out from err
    return path


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(fn: str, path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged one raises :class:`CorruptFileError` naming it.

    Raises:
        FileNotFoundError: no such file (named).
        CorruptFileError: not UTF-8 JSON (e.g. truncated or edited by hand).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{fn}: expected an existing file, got {path}",
                                str(path)) from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{fn}: expected a JSON file, got a damaged file {path} "
                               f"({err})", path) from None


def _pickle_kind(path: Path) -> str:
    """``"zip"`` (torch.save), ``"legacy"`` (old torch.save), ``"pickle"`` (a complete pickle
    stream) or ``"damaged"`` (anything else: truncated, random bytes, another format)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return "zip" if z.testzip() is None else "damaged"
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError):
            return "damaged"
    try:
        with open(path, "rb") as f:
            ops = list(pickletools.genops(f))
    except Exception:  # noqa: BLE001 - pickletools raises ValueError, UnicodeDecodeError, ...
        return "damaged"
    first = next((arg for op, arg, _ in ops if op.name in ("LONG1", "LONG4", "LONG")), None)
    return "legacy" if first == 0x1950A86A20F9469CFC6C else "pickle"


def load_torch(fn: str, path: str | os.PathLike, *, allow_pickle: bool = False,
               what: str = "a torch.save file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with named failures.

    Args:
        fn: public name for the messages (e.g. ``"hbk analyze"``).
        path: the file.
        allow_pickle: on a file that holds pickled objects (a whole ``nn.Module``), fall back
            to ``weights_only=False`` (runs code from the file; trusted files only).
        what: what the file should be, for the messages.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: the file is damaged (truncated, random bytes, another format).
        PickleNeededError: a valid pickle that needs ``allow_pickle`` (the message says so).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{fn}: expected an existing file, got {path}",
                                str(path))
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{fn}: expected {what}, got an empty file {path}", path)
    kind = _pickle_kind(path)
    if kind == "damaged":
        raise CorruptFileError(f"{fn}: expected {what}, got a damaged or foreign file {path} "
                               "(not a readable torch.save archive or pickle; truncated or "
                               "another format?)", path)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "Unsupported global" not in msg and kind != "pickle":
            raise CorruptFileError(f"{fn}: expected {what}, got a damaged file {path} "
                                   "(its pickle data cannot be read)", path) from None
        if not allow_pickle:
            glob = msg.split("Unsupported global: ", 1)[-1].split(" was not", 1)[0]
            detail = f" ({glob.strip()})" if "Unsupported global" in msg else ""
            raise PickleNeededError(f"{fn}: expected weights only, got a pickled object in "
                                    f"{path}{detail}; loading it runs code from the file: "
                                    "pass --allow-pickle (allow_pickle=True) only if you "
                                    "trust it") from None
    except Exception as err:  # noqa: BLE001 - RuntimeError (miniz), EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(f"{fn}: expected {what}, got a damaged file {path} "
                               f"({first[:160]})", path) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        if kind == "pickle":
            raise CorruptFileError(f"{fn}: expected {what}, got a plain pickle {path} that is "
                                   f"not a torch.save file ({type(err).__name__}: "
                                   f"{str(err)[:120]})", path) from None
        raise CorruptFileError(f"{fn}: expected {what}, got a damaged pickle {path} "
                               f"({type(err).__name__}: {str(err)[:160]})", path) from None


def remove_stale_temporaries(directory: str | os.PathLike, older_than: float = 3600.0) -> int:
    """Remove our temporaries (``.*.tmp`` files, ``.tmp-*`` directories) in ``directory`` that
    a killed writer left behind more than ``older_than`` seconds ago. Returns how many."""
    import shutil
    import time

    d = Path(directory)
    if not d.is_dir():
        return 0
    now, count = time.time(), 0
    for p in d.iterdir():
        if not (p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".tmp-"))):
            continue
        try:
            if now - p.lstat().st_mtime < older_than:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            count += 1
        except OSError:
            pass
    return count


@contextlib.contextmanager
def store_lock(directory: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """An advisory ``flock`` on ``directory/.lock`` (created), exclusive unless ``shared``.

    Writers of one store hold it exclusively while they swap a run's files, readers shared
    while they read them, so nobody sees one writer's half-replaced set.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise _explain(d / ".lock", err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
