"""Shared benchmark plumbing: interleaved timing, peak memory, agreement checks, environment,
result tables.

Every benchmark row is produced by :func:`run_tools`: each tool is called once (warm-up; its
answer is checked against the task's ground truth), then the tools that agree are timed in
interleaved rounds (tool A, B, C, A, B, C, ...), so a burst of load on the shared machine hits
every tool alike. A row that disagrees, raises, or whose package is missing carries a status
instead of a speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

OK = "ok"


# ----------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """Peak RSS since the last :func:`reset_hwm` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


class PeakMemory:
    """Context manager: peak memory above the RSS at entry (CPU: VmHWM; CUDA: allocator)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.extra_mb: float | None = None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._ok = reset_hwm()
            self._base = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.extra_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self._ok:
            self.extra_mb = max(0, hwm_bytes() - self._base) / 2**20


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- tools
def have(pkg: str) -> bool:
    """Whether a top-level module can be imported (without importing it)."""
    return importlib.util.find_spec(pkg) is not None


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


@dataclass
class Tool:
    """One contender of a benchmark row.

    Attributes:
        name: row label ("hbk ...", "scipy eigsh + plain HVP", ...).
        make: builds the callable to time (set-up cost stays outside the timing); called once.
        package: import name of the anchor package (None: torch/scipy/hbk, always present).
        ours: the row the ratios are taken against.
        note: how the tool was configured (matched tolerance, budget, ...).
        scale: the timed call covers 1/scale of the work (subset runs); times are multiplied.
        reference: an always-available reference implementation (the smoke test requires
            it to agree).
    """

    name: str
    make: Callable[[], Callable[[], Any]]
    package: str | None = None
    ours: bool = False
    note: str = ""
    scale: float = 1.0
    reference: bool = False
    meta: dict = field(default_factory=dict)


def run_tools(tools: list[Tool], check: Callable[[Any], tuple[bool, float | None, str]],
              repeats: int, *, task: str, case: str, device: str = "cpu",
              slow_s: float = 5.0, extra: dict | None = None) -> list[dict]:
    """Warm-up + agreement check per tool, then interleaved timed repeats.

    Args:
        tools: the contenders (exactly one with ``ours=True`` for the ratio column).
        check: ``check(answer) -> (agrees, accuracy, accuracy_text)``.
        repeats: timed calls per tool after the warm-up (none for a tool whose warm-up took
            longer than ``slow_s``: its warm-up time is its time; the row says "warm-up").
        task, case: labels for the rows.

    Returns:
        one row dict per tool.
    """
    rows, live = [], []
    for t in tools:
        row = {"task": task, "case": case, "tool": t.name, "ours": t.ours, "note": t.note,
               "reference": t.reference, "status": OK, "times": [], "package": t.package,
               **(extra or {}), **t.meta}
        rows.append(row)
        if t.package and not have(t.package):
            row["status"] = f"not installed ({t.package})"
            continue
        try:
            fn = t.make()
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                ans = fn()
                sync(device)
                first = time.perf_counter() - t0
            agrees, acc, acc_text = check(ans)
            del ans
        except Exception as e:  # noqa: BLE001 - any failure becomes the row's status
            row["status"] = "FAIL (error: " + first_line(e) + ")"
            print(f"    {case}: {t.name}: {row['status']}", flush=True)
            continue
        print(f"    {case}: {t.name}: warm-up {first:.3g} s, {acc_text}", flush=True)
        row.update(accuracy=acc, accuracy_text=acc_text, warmup_s=first * t.scale,
                   peak_mb=None if mem.extra_mb is None else mem.extra_mb * t.scale)
        if not agrees:
            row["status"] = f"FAIL (disagrees: {acc_text})"
            continue
        live.append((t, fn, row, 0 if first > slow_s else repeats))
    for r in range(max((x[3] for x in live), default=0)):
        for t, fn, row, reps in live:
            if r >= reps:
                continue
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                fn()
                sync(device)
                row["times"].append((time.perf_counter() - t0) * t.scale)
            if mem.extra_mb is not None:
                row["peak_mb"] = max(row.get("peak_mb") or 0.0, mem.extra_mb * t.scale)
    for _, _, row, _ in live:
        ts = row["times"] or [row["warmup_s"]]
        row["median_s"] = statistics.median(ts)
        row["spread"] = (max(ts) - min(ts)) / (2 * row["median_s"]) if len(ts) > 1 else None
        row["repeats"] = len(row["times"])
    ours = next((r for r in rows if r["ours"] and r.get("median_s")), None)
    for r in rows:
        if ours and r.get("median_s"):
            r["ratio"] = r["median_s"] / ours["median_s"]
    return rows


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "hbkernels", "csrc", "python"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_meta() -> dict:
    """Environment of a run: versions, threads, CPU, commit, load average, date."""
    import torch

    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def package_versions(names: list[str]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


# ----------------------------------------------------------------------------- output
def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` = [(key, header)]; floats are printed with 3 significant digits."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)).replace("|", "/") for k, _ in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def tool_table(rows: list[dict]) -> str:
    """The per-task table: tool, time, spread, ratio to ours, accuracy, peak memory."""
    view = []
    for r in rows:
        ok = r["status"] == OK
        view.append({
            "case": r["case"], "tool": ("**" + r["tool"] + "**") if r["ours"] else r["tool"],
            "time": (f"{r['median_s']:.3g} s" + (f" ±{100 * r['spread']:.0f}%"
                                                 if r.get("spread") is not None else "")
                     + (f" ({r['repeats']}x)" if r.get("repeats") else " (warm-up)"))
            if ok else r["status"],
            "ratio": f"{r['ratio']:.2f}" if ok and r.get("ratio") else "",
            "accuracy": r.get("accuracy_text", ""),
            "peak": f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "",
            "note": r.get("note", ""),
        })
    return markdown_table(view, [("case", "case"), ("tool", "tool"),
                                 ("time", "median time ±half-range (timed runs)"),
                                 ("ratio", "time / ours"), ("accuracy", "accuracy vs truth"),
                                 ("peak", "peak MB above start"), ("note", "how run")])


def save_results(name: str, rows: Any, table: str, meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{json.dumps(meta)}\n\n{table}\n")


def run_worker(script: str, *args: str, timeout: float = 1800) -> dict:
    """Run ``python script --worker args...`` in a fresh process; it prints one JSON line last."""
    cmd = [sys.executable, script, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
