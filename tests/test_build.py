"""The compiled extension: build info and the import-time torch version check."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import hbkernels as hbk
from hbkernels import _build_info
from hbkernels._loader import ExtensionVersionError, check_torch_version

ROOT = Path(__file__).resolve().parent.parent


def test_build_info_records_the_running_torch():
    assert _build_info.TORCH_VERSION == torch.__version__
    assert hbk._C.TORCH_VERSION == torch.__version__


def test_version_check_accepts_equal_versions():
    check_torch_version("2.13.0+cpu", "2.13.0+cpu")


def test_version_check_names_both_versions():
    with pytest.raises(ExtensionVersionError, match=r"built against torch 2\.13\.0\+cpu, but torch 2\.14\.1 is installed"):
        check_torch_version("2.13.0+cpu", "2.14.1")


def test_import_under_another_torch_fails_readably():
    code = (
        "import torch; torch.__version__ = '9.9.9'\n"
        "try:\n"
        "    import hbkernels\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=120)
    assert "ExtensionVersionError" in out.stdout, out.stdout + out.stderr
    assert "torch 9.9.9 is installed" in out.stdout
    assert f"built against torch {torch.__version__}" in out.stdout
    assert "--no-build-isolation --force-reinstall --no-deps ." in out.stdout  # the fix
    assert "TORCH_SPEC=torch==9.9.9" in out.stdout


def test_mismatch_message_gives_the_source_rebuild():
    with pytest.raises(ExtensionVersionError) as err:
        check_torch_version("2.13.0+cpu", "2.14.1+cu128")
    msg = str(err.value)
    # hbkernels is on no index: the fix is a rebuild from the source tree against this torch.
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in msg
    assert "make install TORCH_SPEC=torch==2.14.1" in msg
    assert "torch 2.13.0+cpu" in msg and "torch 2.14.1+cu128" in msg
    assert "install --no-build-isolation --force-reinstall --no-deps hbkernels" not in msg


def test_build_info_matches_the_installed_distribution():
    assert _build_info.VERSION == metadata.version("hbkernels")
    assert _build_info.VERSION.startswith(hbk.__version__ + "+torch")
    assert _build_info.TORCH_CUDA == (torch.version.cuda or "")
    assert _build_info.CUDA_KERNELS in (True, False)
    assert f"torch=={torch.__version__.split('+')[0]}" in metadata.requires("hbkernels")


def test_python_m_hbkernels_reports_build_and_runtime():
    run = [sys.executable, "-m", "hbkernels"]
    text = subprocess.run(run, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"hbkernels {hbk.__version__} (distribution {_build_info.VERSION})" in text
    assert f"torch:         {_build_info.TORCH_VERSION}" in text
    assert _build_info.CXX_COMPILER in text
    assert f"{torch.get_num_threads()} intra-op" in text
    assert "CUDA:          " + ("available" if torch.cuda.is_available() else "not available") in text
    info = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True,
                                     timeout=120, check=True).stdout)
    assert info["built_with_torch"] == _build_info.TORCH_VERSION
    assert info["torch"] == torch.__version__
    assert info["intra_op_threads"] == torch.get_num_threads()
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["distribution"] == _build_info.VERSION


def _build_metadata():
    spec = importlib.util.spec_from_file_location("hbk_metadata", ROOT / "cmake" / "hbk_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("torch_version, cuda, label", [
    ("2.13.0+cpu", None, "torch2.13.0.cpu"),
    ("2.13.0+cu128", "12.8", "torch2.13.0.cu128"),
    ("2.13.0", "12.8", "torch2.13.0.cu128"),  # PyPI's CUDA build has no local part
    ("2.13.0", None, "torch2.13.0.cpu"),
    ("2.14.0.dev20260101+rocm6.3", None, "torch2.14.0.dev20260101.rocm6.3"),
])
def test_wheel_version_names_the_torch_build(torch_version, cuda, label):
    meta = _build_metadata()
    assert meta.torch_local_label(torch_version, cuda) == label
    assert meta.torch_requirement(torch_version) == f"torch=={torch_version.split('+')[0]}"


def _make(*args: str, **env: str) -> list[str]:
    """Dry or fake runs of the Makefile (nothing installed): its recipe lines."""
    out = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", *args],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, **env})
    return out.stdout.splitlines()


def test_makefile_version_floors_are_quoted(tmp_path):
    lines = [ln for ln in _make("-n", "-B", "setup", "wheel", f"VENV={tmp_path}/v")
             if " pip install" in ln and "--upgrade pip" not in ln]
    assert any("scikit-build-core>=" in ln for ln in lines), lines
    assert any('"cmake>=' in ln for ln in lines), "the set-up installs CMake (the cmake wheel)"
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        # An unquoted `>=` would be a shell redirection (it created files named `=0.10`).
        assert not [t for t in tokens if set(t) <= set("<>|&;")], line
        assert "-c" in tokens, f"not constrained to TORCH_SPEC: {line}"


def test_makefile_torch_spec_change_reinstalls_torch_and_rebuilds(tmp_path):
    # A fake venv: `pip` only echoes, so the stamps' logic runs without installing anything.
    # (EXT_SOURCES empty: a concurrent source edit must not make the second run rebuild.)
    fake = [f"VENV={tmp_path}", "PY=/bin/true", "PIP=echo pip", "BUILD_LOCK=", "EXT_SOURCES="]
    first = _make("install", *fake, "TORCH_SPEC=torch==2.13.0")
    assert any('install -q -c' in ln and '"torch==2.13.0"' in ln for ln in first), first
    assert any("--no-build-isolation -e" in ln for ln in first), first
    assert _make("install", *fake, "TORCH_SPEC=torch==2.13.0") == []  # up to date
    changed = _make("install", *fake, "TORCH_SPEC=torch==2.14.1")
    assert any('"torch==2.14.1"' in ln for ln in changed), changed
    assert any("--no-build-isolation -e" in ln for ln in changed), changed
    assert (tmp_path / "constraints.txt").read_text() == "torch==2.14.1\n"
