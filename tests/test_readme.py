"""Every code block of README.md runs as written.

* ```python blocks run in README order, each in a fresh namespace, except a block whose first
  line is ``# (continues the previous block)``: it runs in the namespace of the block before
  it. A block whose first line is ``# file: NAME.py`` is written to ``NAME.py`` (and compiled),
  as the file a reader would create; the work directory is on ``sys.path`` while the blocks
  run, as it is for ``python`` started there.
* ```bash / ```sh blocks run in a ``bash -euo pipefail`` subprocess with the running
  interpreter's ``bin`` first on ``PATH`` (so ``python`` and ``hbk`` are this installation's).
* A block whose first line is ``# not run by the tests: <reason>`` is skipped with that
  reason (the expensive ones: installs, ``make demo``, ``hbk reproduce``, ``make bench``).
* All blocks share one temporary working directory, so a shell block can analyse a model that
  an earlier Python block saved.

Other fenced blocks must be ```text or ```bibtex (not code). Intra-op threads are set to one
while the blocks run (tiny problems; see ``one_thread`` in conftest.py).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "# not run by the tests:"
CONTINUES = "# (continues the previous block)"
FILE = re.compile(r"^# file: ([A-Za-z0-9_./-]+\.py)\s*$")
RUN_LANGS = {"python", "bash", "sh"}
TEXT_LANGS = {"text", "bibtex"}
#: Relative links allowed to point at an output that does not exist yet (written by a command).
GENERATED = {"bench/RESULTS.md"}


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence

    @property
    def first(self) -> str:
        return self.code.split("\n", 1)[0].strip()

    @property
    def skip_reason(self) -> str | None:
        return self.first[len(SKIP):].strip() if self.first.startswith(SKIP) else None

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, in order (an unclosed fence is an error)."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if m is None:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md: expected a closing fence for the block at line {start}")
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUN = [b for b in BLOCKS if b.lang in RUN_LANGS]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    """One working directory for every block, on sys.path, as the current directory."""
    d = tmp_path_factory.mktemp("readme")
    old_cwd, old_path = os.getcwd(), list(sys.path)
    old_modules = set(sys.modules)
    old_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"
    os.chdir(d)
    sys.path.insert(0, str(d))
    state: dict = {"ns": None, "failed": False}
    yield d, state
    os.chdir(old_cwd)
    sys.path[:] = old_path
    if old_backend is None:
        os.environ.pop("MPLBACKEND", None)
    else:
        os.environ["MPLBACKEND"] = old_backend
    for name in set(sys.modules) - old_modules:  # the reader's modules (mymodel.py, ...)
        mod = sys.modules.get(name)
        if mod is not None and str(getattr(mod, "__file__", "") or "").startswith(str(d)):
            del sys.modules[name]


def _run_python(block: Block, d: Path, state: dict) -> None:
    m = FILE.match(block.first)
    if m:
        path = d / m.group(1)
        path.write_text(block.code)
        compile(block.code, str(path), "exec")
        return
    if block.first == CONTINUES:
        if state["ns"] is None or state["failed"]:
            pytest.skip("the block it continues did not run")
        ns = state["ns"]
    else:
        ns = {"__name__": "__readme__"}
    state["ns"], state["failed"] = ns, True
    exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)  # noqa: S102 (the point)
    state["failed"] = False


def _run_shell(block: Block, d: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")  # no PYTHONPATH: run as a reader would
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=d, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (f"README.md block at line {block.line} exited {r.returncode}:\n"
                               f"{block.code}\n--- stdout\n{r.stdout[-3000:]}\n"
                               f"--- stderr\n{r.stderr[-3000:]}")


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_block_runs(block: Block, workdir) -> None:
    d, state = workdir
    if block.skip_reason is not None:
        pytest.skip(f"README.md:{block.line}: {block.skip_reason}")
    if block.lang == "python":
        _run_python(block, d, state)
    else:
        _run_shell(block, d)


def test_readme_outputs_exist(workdir) -> None:
    """What the blocks say they write is there (after the blocks ran)."""
    d, _ = workdir
    for name in ("analysis.json", "analysis.pt", "alignment.png", "alignment.pdf",
                 "spectrum.png", "spectrum.pdf", "sd.pt", "data.pt",
                 "my-analysis/report.md", "my-analysis/analysis_full.pt"):
        assert (d / name).is_file(), f"README block outputs: expected {name} in {d}"


def test_readme_blocks_are_code_or_text() -> None:
    """Every fenced block is executed (python/bash/sh) or declared as not code."""
    bad = [b.id for b in BLOCKS if b.lang not in RUN_LANGS | TEXT_LANGS]
    assert not bad, f"README.md: expected a language in {sorted(RUN_LANGS | TEXT_LANGS)}, got {bad}"
    executed = [b for b in RUN if b.skip_reason is None]
    assert len([b for b in executed if b.lang == "python"]) >= 5
    assert len([b for b in executed if b.lang != "python"]) >= 2
    for b in RUN:
        if b.skip_reason is not None:
            assert b.skip_reason, f"README.md:{b.line}: expected a reason after {SKIP!r}"


def test_readme_continuation_follows_a_python_block() -> None:
    py = [b for b in RUN if b.lang == "python" and b.skip_reason is None]
    for prev, b in itertools.pairwise(py):
        if b.first == CONTINUES:
            assert not FILE.match(prev.first), f"README.md:{b.line} continues a file block"
    assert py[0].first != CONTINUES


def test_readme_links_and_names() -> None:
    """Relative links resolve; no pointer to files that are not in the repository."""
    text = README.read_text()
    root = README.parent
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" in target:
            continue
        assert (root / target).exists() or target in GENERATED, f"README.md: broken link {target}"
    for name in ("DESIGN.md", "reference_setup.md"):
        assert name not in text, f"README.md: expected no pointer to {name} (not in the repository)"
    for section in ("## Install", "## Quick start", "## Your own model", "## The paper's measures",
                    "## Layout", "## Reproducing the paper", "## Performance", "## GPU",
                    "## Citation", "## Licence"):
        assert section in text, f"README.md: expected a section {section!r}"
