"""``python -m hbkernels``: version, build and runtime information (paste it into bug reports)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

import hbkernels
from hbkernels import _build_info


def _distribution_version() -> str:
    try:
        return metadata.version("hbkernels")
    except metadata.PackageNotFoundError:
        return "not installed (imported from a source tree)"


def _cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def collect_info() -> dict[str, object]:
    """What this hbkernels is, what it was built with, and the torch it runs under.

    Returns:
        A flat dict of JSON-serialisable values (the keys :func:`format_info` prints).
    """
    return {
        "hbkernels": hbkernels.__version__,
        "distribution": _distribution_version(),
        "location": str(Path(hbkernels.__file__).parent),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "built_with_torch": _build_info.TORCH_VERSION,
        "built_with_torch_cuda": _build_info.TORCH_CUDA or None,
        "cuda_kernels": bool(_build_info.CUDA_KERNELS),
        "compiler": _build_info.CXX_COMPILER,
        "build_type": _build_info.BUILD_TYPE,
        "cmake": _build_info.CMAKE_VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": _cuda_devices(),
    }


def format_info(info: dict[str, object]) -> str:
    """Human-readable lines of :func:`collect_info`'s dict."""
    built_cuda = info["built_with_torch_cuda"]
    running_cuda = info["torch_cuda"]
    devices = info["cuda_devices"] or []
    lines = [
        f"hbkernels {info['hbkernels']} (distribution {info['distribution']})",
        f"  location:      {info['location']}",
        f"  python:        {info['python']}",
        f"  platform:      {info['platform']}",
        "build",
        f"  torch:         {info['built_with_torch']} "
        + (f"(CUDA {built_cuda})" if built_cuda else "(CPU build, no CUDA)"),
        f"  compiler:      {info['compiler']}, {info['build_type']}, CMake {info['cmake']}",
        "  kernels:       C++ on ATen for CPU and CUDA tensors"
        + (", with CUDA kernels of its own" if info["cuda_kernels"] else ""),
        "runtime",
        f"  torch:         {info['torch']} "
        + (f"(CUDA {running_cuda})" if running_cuda else "(CPU build, no CUDA)"),
        f"  threads:       {info['intra_op_threads']} intra-op, "
        f"{info['inter_op_threads']} inter-op"
        + (f" (OMP_NUM_THREADS={info['omp_num_threads_env']})"
           if info["omp_num_threads_env"] is not None else ""),
        f"  CUDA:          {'available' if info['cuda_available'] else 'not available'}"
        + (f", {len(devices)} device(s): {', '.join(devices)}" if devices else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the information; ``--json`` prints it as one JSON object."""
    parser = argparse.ArgumentParser(
        prog="python -m hbkernels", description="hbkernels version, build and runtime info"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
