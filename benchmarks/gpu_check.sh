#!/usr/bin/env bash
# One-shot GPU check of lazymerge's CUDA path (bit identity, kernel bandwidth, end-to-end merge).
#   bash benchmarks/gpu_check.sh [gpu_check.py options]     # from the repo root
# Needs a Python with torch (CUDA build) and triton; installs nothing heavy. Finishes in < 5 min:
# the Python side keeps to its own budget (--budget, default 280 s) and this wrapper interrupts it
# (SIGINT, so it still prints the report) if it overruns.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

# The first interpreter that has torch and triton: $PYTHON, the active venv, the repo's .venv, PATH.
PY=""
for cand in "${PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import torch, triton" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: FAIL - no Python with torch and triton found (set PYTHON=/path/to/python)"
    exit 2
fi
echo "gpu_check: using $PY"

# lazymerge from this checkout: an editable install when it is missing (no dependencies, no
# build isolation: the machine may be offline), and PYTHONPATH as a fallback either way.
if ! "$PY" -c "import lazymerge" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
        || echo "gpu_check: pip install -e . failed; using PYTHONPATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

timeout --signal=INT --kill-after=20 295 "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
rc=$?
if [ "$rc" -eq 124 ]; then echo "gpu_check: interrupted by the 295 s limit"; fi
exit "$rc"
