"""Install the benchmark anchors (pyproject's optional extra ``bench``) without touching torch.

Usage: python bench/install_anchors.py [-c CONSTRAINTS] [--dry-run]

Every pip call is constrained to the running torch (``-c``: the Makefile's constraints file,
or one written here with ``torch==<running version>``), so no anchor can replace it.
BackPACK and curvlinops are installed with ``--no-deps``: BackPACK declares torchvision,
which it does not need here and which would pull in a torchvision build for a different
torch; their real dependencies (einops, unfoldNd, einconv, linear_operator, opt-einsum) are
listed in the extra. Any other anchor whose resolution fails under the constraint (e.g. an
Opacus release that asks for another torch) is retried with ``--no-deps``. At the end the
script checks that torch is the one it started with.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DEPS = {"backpack-for-pytorch", "curvlinops-for-pytorch"}


def bench_extra(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings of ``[project.optional-dependencies] bench``."""
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    try:
        return list(data["project"]["optional-dependencies"]["bench"])
    except KeyError as e:
        raise SystemExit(f"install_anchors: expected a 'bench' extra in {pyproject}") from e


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _pip(args: list[str], dry: bool) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    return 0 if dry else subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--constraints", default=None,
                    help="pip constraints file (default: torch==<running torch>)")
    ap.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = ap.parse_args(argv)
    torch_before = _torch_version()
    reqs = bench_extra()
    with tempfile.TemporaryDirectory() as tmp:
        cons = args.constraints
        if cons is None:
            cons = str(Path(tmp) / "constraints.txt")
            Path(cons).write_text(f"torch=={torch_before.split('+')[0]}\n")
        nodeps = [r for r in reqs if _name(r) in NO_DEPS]
        rest = [r for r in reqs if _name(r) not in NO_DEPS]
        failed = []
        if nodeps and _pip(["-c", cons, "--no-deps", *nodeps], args.dry_run):
            failed += nodeps
        if rest and _pip(["-c", cons, *rest], args.dry_run):
            for r in rest:  # one at a time; retry without dependencies
                if _pip(["-c", cons, r], args.dry_run) and \
                        _pip(["-c", cons, "--no-deps", r], args.dry_run):
                    failed.append(r)
    torch_after = _torch_version()
    if torch_after != torch_before:
        print(f"install_anchors: torch changed from {torch_before} to {torch_after}",
              file=sys.stderr)
        return 1
    if failed:
        print("install_anchors: not installable here: " + ", ".join(failed) +
              " (their benchmark rows will say 'not installed')", file=sys.stderr)
    print(f"install_anchors: done, torch {torch_after} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
