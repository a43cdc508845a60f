"""Build-time wheel metadata: the version and the torch pin name the torch it is built against.

A torch C++ extension loads only under the torch it was compiled with, so the wheel says so:
``Requires-Dist: torch==2.13.0`` and the local version ``0.2.0+torch2.13.0.cpu``. scikit-build-core
calls :func:`dynamic_metadata` through ``[[tool.dynamic-metadata]]`` in pyproject.toml; the
build runs without isolation, so the torch imported here is the one the extension links.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_VERSION_RE = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


def torch_local_label(torch_version: str, cuda_version: str | None) -> str:
    """Local-version label naming a torch build, e.g. ``torch2.13.0.cpu``, ``torch2.13.0.cu128``.

    Args:
        torch_version: ``torch.__version__`` (``"2.13.0+cpu"``, ``"2.13.0"``).
        cuda_version: ``torch.version.cuda`` (``"12.8"`` or None); names the variant when the
            version string has no local part.
    """
    public, _, local = torch_version.partition("+")
    variant = local or (f"cu{cuda_version.replace('.', '')}" if cuda_version else "cpu")
    label = f"torch{public}.{variant}".lower()
    return re.sub(r"[^a-z0-9.]+", ".", label).strip(".")


def torch_requirement(torch_version: str) -> str:
    """The wheel's torch pin: ``torch==<public version>`` (``2.13.0+cpu`` -> ``torch==2.13.0``)."""
    return f"torch=={torch_version.partition('+')[0]}"


def _running_torch() -> tuple[str, str | None]:
    try:
        with warnings.catch_warnings():  # "Failed to initialize NumPy": numpy comes later
            warnings.simplefilter("ignore")
            import torch
    except ImportError as exc:
        raise RuntimeError(
            "hbkernels: torch is not importable in the build environment. Install torch "
            "first, then build without isolation: `pip install --no-build-isolation .` "
            "(or `make install` / `make wheel`)."
        ) from exc
    return torch.__version__, torch.version.cuda


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    """``version`` and ``dependencies`` of the wheel being built (dynamic-metadata hook).

    Settings: ``version-file`` (a file with ``__version__ = "X.Y.Z"``) and ``dependencies``
    (the requirements other than torch).
    """
    text = Path(settings["version-file"]).read_text(encoding="utf-8")
    match = _VERSION_RE.search(text)
    if match is None:
        raise RuntimeError(f"hbkernels: no __version__ in {settings['version-file']}")
    torch_version, cuda_version = _running_torch()
    return {
        "version": f"{match.group(1)}+{torch_local_label(torch_version, cuda_version)}",
        "dependencies": [torch_requirement(torch_version), *settings.get("dependencies", [])],
    }
