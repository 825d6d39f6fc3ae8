#!/usr/bin/env bash
# The prepared GPU check: build and install frmap offline, run the CUDA tests and both GPU
# benchmarks, write what they report into OUTDIR, in under 9 minutes.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Made for a bare NVIDIA H200 machine (Python 3.12, torch 2.11 + CUDA 13, triton 3.6,
# scikit-build-core, nanobind, cmake, ninja, scikit-image, scikit-learn, pytest,
# pytest-benchmark, hypothesis, cupy-cuda13x; no package registry), run from the checkout's
# root. What it lacks comes as wheels in the git-ignored folder .whl, fetched beforehand where
# a registry is reachable:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.2.1 \
#     gitdb==4.0.12 smmap==5.0.3 captum==0.9.0 cucim-cu13==26.10.0
#
# (19 MiB: foolbox, eagerpy, GitPython, gitdb, smmap, captum pure Python; cucim-cu13 for
# CPython 3.12 only. Their other needs are on that machine already: requests, setuptools,
# typing-extensions, matplotlib, tqdm, packaging, click, lazy-loader, cupy-cuda13x.)
#
# Steps, each under its own time limit (seconds) so that a slow one cannot eat the rest:
#   environment 30, wheels 40, build 110, bench responses 80, bench entropy 100, cupy 30,
#   tests 150
# (540 in all; the tests on 4 workers where pytest-xdist is installed, as it is there). The
# entropy benchmark includes cuCIM's published 1920x1080 table (frmap on torch and on CuPy,
# cuCIM, scikit-image); the cupy step runs the CuPy round trip of the entropy op (CuPy in, CuPy
# out on the same GPU, no device-to-host copy, out_dtype float32).
# OUTDIR receives gpu_check.log (every step's output), summary.txt (one line per step),
# bench-responses-cuda.json, bench-entropy-cuda.json, pytest-cupy.xml and pytest-cuda.xml.
# Without a CUDA device (a dry run) the CUDA steps run and report their rows and tests as
# skipped; the check then passes when everything else does. Exit status 0: every step passed.
#
# PYTHON picks the interpreter (default python3, or .venv/bin/python where python3 has no
# torch).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/summary.txt
: >"$LOG"
: >"$SUMMARY"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
SITE=$(mktemp -d /tmp/frmap-gpu-check.XXXXXX)
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
FAILED=0
CUDA=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS CUDA_STEP COMMAND...: run COMMAND (a program or one of the functions below)
# under its time limit, log and summarise
step() {
    local name=$1 budget=$2 cuda_step=$3 start=$SECONDS rc status
    shift 3
    say ""
    say "=== $name (limit ${budget}s): $*"
    timeout --kill-after=10 "$budget" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMED OUT after ${budget}s"
    elif [ $rc -ne 0 ]; then
        status="FAILED (exit $rc)"
    elif [ "$cuda_step" = cuda ] && [ $CUDA -eq 0 ]; then
        status="skipped: no CUDA device (dry run passed)"
    else
        status=ok
    fi
    [ "$status" = ok ] || [ "${status#skipped}" != "$status" ] || FAILED=1
    say "=== $name: $status ($((SECONDS - start))s)"
    printf '%-18s %-45s %4ss\n' "$name" "$status" "$((SECONDS - start))" >>"$SUMMARY"
}

environment() {
    "$PYTHON" - "$SITE" <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not installed", err)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
with open(f"{sys.argv[1]}/cuda", "w") as flag:
    flag.write(str(int(torch.cuda.is_available())))
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv || echo "nvidia-smi: not here"
}

# The pure-Python wheels must install; cuCIM is CPython 3.12 only (the entropy benchmark notes
# its absence and runs the Triton rows alone).
wheels() {
    [ -d .whl ] || { echo "no .whl folder: see this script's header"; return 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        --find-links .whl foolbox eagerpy GitPython gitdb smmap captum || return 1
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        --find-links .whl cucim-cu13 || echo "cucim-cu13: no wheel for this Python; no cuCIM rows"
}

build() {
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE" . || return 1
    "$PYTHON" -c "import frmap.kernels.cpu._ext, frmap.engine; print('frmap from', \
frmap.engine.__file__)"
}

frmap() { "$PYTHON" -m frmap.engine.cli "$@"; }

export PYTHON SITE
export -f environment wheels build frmap

say "frmap GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null)"
say "python: $PYTHON; packages installed into $SITE"
step environment 30 host environment
CUDA=$(cat "$SITE/cuda" 2>/dev/null || echo 0)
step wheels 40 host wheels
step build 110 host build
step "bench responses" 80 cuda frmap bench responses --device cuda \
    --json "$OUTDIR/bench-responses-cuda.json"
step "bench entropy" 100 cuda frmap bench entropy --device cuda \
    --json "$OUTDIR/bench-entropy-cuda.json"
step cupy 30 cuda "$PYTHON" -m pytest -m cuda -q -ra -p no:cacheprovider \
    --junitxml="$OUTDIR/pytest-cupy.xml" tests/kernels/test_tensor_arrays.py -k cupy
WORKERS=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 4")
step tests 150 cuda "$PYTHON" -m pytest -m cuda $WORKERS -q -ra -p no:cacheprovider \
    --junitxml="$OUTDIR/pytest-cuda.xml" tests
rm -rf "$SITE"

say ""
say "=== summary ($SECONDS s in all)"
tee -a "$LOG" <"$SUMMARY"
exit $FAILED
