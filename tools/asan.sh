#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ kernels (`make asan`).
#
# Usage:  tools/asan.sh [pytest args...]     (default: tests/test_ops.py tests/test_kernels.py
#                                              tests/test_lanczos.py)
#
# What it does, without touching the normal build (build/<wheel_tag>) or the .venv install:
#   1. configures the extension with CMake into build/asan, compiled and linked with
#      -fsanitize=address,undefined -fno-sanitize-recover=all (any UB report aborts the test
#      process) -fno-omit-frame-pointer -g, and installs _C + _build_info.py into
#      build/asan/site/hbkernels/, next to symlinks to the Python sources of hbkernels/;
#   2. creates build/asan/venv (no pip) whose only .pth puts build/asan/site first and then
#      .venv's site-packages (torch, pytest, hypothesis). .venv's own .pth files (the editable
#      install of the normal build) are not processed from there, so `import hbkernels` in this
#      venv finds the sanitized extension;
#   3. runs pytest in that venv with
#        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
#                      the ASan runtime must come first in the process (python itself is not
#                      instrumented, so it is preloaded rather than linked into the
#                      interpreter), and libstdc++ with it: python does not link libstdc++, so
#                      without it ASan cannot resolve the real __cxa_throw and aborts at the
#                      first C++ exception ("CHECK failed: real___cxa_throw != 0");
#        ASAN_OPTIONS=detect_leaks=0:...               CPython and torch keep allocations until
#                      exit by design, so leak reports would be noise; errors abort with a
#                      report on stderr (halt_on_error, the ASan default);
#        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1.
#      Reports are written to build/asan/logs/ (pytest would capture them) and printed at the
#      end; a clean run is pytest's summary plus "asan.sh: no sanitizer reports". The exit
#      status is pytest's, or 1 when there is any report.
#
# Only the compiled code of hbkernels is instrumented (not libtorch), so reports point at
# csrc/ or python/. Needs gcc with libasan/libubsan (Debian: gcc's own, as here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV_PY="$ROOT/.venv/bin/python"
[ -x "$VENV_PY" ] || { echo "asan.sh: run \`make install\` first (no .venv)" >&2; exit 2; }
BUILD="$ROOT/build/asan"
SITE="$BUILD/site"
AVENV="$BUILD/venv"
CMAKE="$ROOT/.venv/bin/cmake"; [ -x "$CMAKE" ] || CMAKE=cmake
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
[ -e "$LIBASAN" ] || { echo "asan.sh: libasan.so not found (gcc -print-file-name)" >&2; exit 2; }

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
"$CMAKE" -S "$ROOT" -B "$BUILD/cmake" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$VENV_PY" -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
"$CMAKE" --build "$BUILD/cmake"
"$CMAKE" --install "$BUILD/cmake" --prefix "$SITE" >/dev/null

# The Python sources, as symlinks (edits show up without a re-run of this script's install).
for f in "$ROOT"/hbkernels/*; do
  case "$(basename "$f")" in _C*|_build_info.py|__pycache__) continue ;; esac
  ln -sfn "$f" "$SITE/hbkernels/$(basename "$f")"
done

BASE_PY="$("$VENV_PY" -c 'import sys; print(sys._base_executable)')"
[ -x "$AVENV/bin/python" ] || "$BASE_PY" -m venv --without-pip "$AVENV"
APURE="$("$AVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VPURE="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$SITE" "$VPURE" > "$APURE/hbk_asan.pth"

# The sanitized module must be the one imported: PYTHONSAFEPATH keeps the working directory
# (whose hbkernels/ has no _C) off sys.path, here and in subprocesses of the tests.
export PYTHONSAFEPATH=1
"$AVENV/bin/python" - <<EOF
import importlib.util, sys
spec = importlib.util.find_spec("hbkernels")
assert spec.origin.startswith("$SITE"), f"asan.sh: hbkernels resolves to {spec.origin}"
EOF

if [ $# -eq 0 ]; then
  set -- tests/test_ops.py tests/test_kernels.py tests/test_lanczos.py
fi
# Reports go to files (pytest captures the test's stderr, and an aborted process never shows
# it): build/asan/logs/{asan,ubsan}.<pid>, printed below when there are any.
LOGS="$BUILD/logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
export ASAN_OPTIONS="detect_leaks=0:print_summary=1:log_path=$LOGS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan"
status=0
LD_PRELOAD="$LIBASAN $LIBSTDCXX" "$AVENV/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
if compgen -G "$LOGS/*" >/dev/null; then
  echo "asan.sh: sanitizer reports (status $status):" >&2
  cat "$LOGS"/* >&2
  [ "$status" -ne 0 ] || status=1
else
  echo "asan.sh: no sanitizer reports (pytest status $status)"
fi
exit "$status"
