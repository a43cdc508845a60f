"""Loads the compiled extension after checking it matches the running torch."""

from __future__ import annotations

import torch


class ExtensionVersionError(ImportError):
    """The compiled extension was built for a different torch than the one running."""


def check_torch_version(built: str, running: str) -> None:
    """Raise ExtensionVersionError unless `built` and `running` torch versions agree.

    A torch extension links libtorch, so it only works with the torch it was compiled against
    (the local suffix such as ``+cpu`` included).
    """
    if built != running:
        raise ExtensionVersionError(
            f"hbkernels: the compiled extension was built against torch {built}, "
            f"but torch {running} is installed. Rebuild it for this torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps hbkernels` "
            "(from a source checkout: `pip install --no-build-isolation .`), "
            f"or install torch=={built.split('+')[0]}."
        )


def load_extension():
    """Import and return ``hbkernels._C`` (registers ``torch.ops.hbkernels``)."""
    try:
        from . import _build_info
    except ImportError as exc:  # a source tree that was never built
        raise ImportError(
            "hbkernels: the compiled extension is missing; install the package with "
            "`pip install --no-build-isolation .` (torch must be installed first)"
        ) from exc
    check_torch_version(_build_info.TORCH_VERSION, torch.__version__)
    from . import _C

    return _C
