"""Loads the compiled extension after checking it matches the running torch."""

from __future__ import annotations

import torch

# hbkernels is not published on a package index: the fix for a mismatch is always a rebuild
# from the source tree against the torch that is installed (or going back to the old torch).
REBUILD_HINT = (
    "hbkernels is built from source (it is on no package index): in its source tree, rebuild "
    "it against the installed torch with `python -m pip install --no-build-isolation "
    "--force-reinstall --no-deps .` (the repository's .venv: `make install "
    "TORCH_SPEC=torch=={running}`)"
)


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
            f"but torch {running} is installed. "
            + REBUILD_HINT.format(running=running.split("+")[0])
            + f"; or reinstall the torch it was built with (torch {built})."
        )


def load_extension():
    """Import and return ``hbkernels._C`` (registers ``torch.ops.hbkernels``)."""
    try:
        from . import _build_info
    except ImportError as exc:  # a source tree that was never built
        raise ImportError(
            "hbkernels: the compiled extension is missing (this is a source tree that was "
            "never built). Install torch first, then build it: `python -m pip install "
            "--no-build-isolation .` from the source tree, or `make install`."
        ) from exc
    check_torch_version(_build_info.TORCH_VERSION, torch.__version__)
    from . import _C

    return _C
