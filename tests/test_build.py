"""The compiled extension: build info and the import-time torch version check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hbkernels as hbk
from hbkernels import _build_info
from hbkernels._loader import ExtensionVersionError, check_torch_version


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ExtensionVersionError" in out.stdout, out.stdout + out.stderr
    assert "torch 9.9.9 is installed" in out.stdout
