"""Atomic file writes: a unique temporary in the target directory, fsync, then rename.

A reader never sees a half-written file and two writers never share a temporary name. Disk
full and permission errors are re-raised as ``OSError`` subclasses whose message names the
path and the cause.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "check_writable"]


def _explain(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ENOSPC:
        why = "the disk is full"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system)"
    else:
        why = err.strerror or str(err)
    out = type(err)(err.errno, f"hbk: could not write {path}: {why}")
    out.filename = str(path)
    return out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created). Returns the path."""
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
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _explain(path, err) from err
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then an atomic write (never a half-written ``.pt``)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def check_writable(fn: str, path: str | os.PathLike, directory: bool = True) -> Path:
    """Before long work: create ``path`` (a directory, or a file's parent) and prove a file can be
    written there; raise ``OSError`` naming ``fn`` and the path otherwise."""
    path = Path(path)
    target = path if directory else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".hbk-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OSError(err.errno, f"{fn}: expected a writable location, got {target} "
                      f"({_explain(target, err).strerror})") from err
    return path
