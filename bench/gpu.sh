#!/usr/bin/env bash
# GPU benchmark of ovseg (bench/gpu.py; docs/benchmarks.md "GPU"), at most 8 minutes.
#
#   bench/gpu.sh                         # on a CUDA machine: float32, float16, bfloat16
#   bench/gpu.sh --device cpu --quick    # smoke test anywhere
#
# Needs python3 with PyTorch, torchvision, timm, numpy, pyarrow and scikit-learn. The other packages
# the pipeline imports (bench/gpu-requirements.txt: open_clip, segment-anything, numcodecs, pydantic,
# ...) are installed from the wheelhouse (`make wheelhouse` on a machine with pip access; carry
# bench/out/wheels) into a private folder, without network and without touching the interpreter's
# own packages. No Prefect: the pipeline runs without it. Arguments go to bench/gpu.py; results are
# printed and written to bench/out/gpu.{json,md} (and $OUT when set).
# Environment: PYTHON (default python3), WHEELHOUSE (default bench/out/wheels), GPU_BENCH_SITE (the
# private folder, default /tmp/ovseg-gpu-site), GPU_BENCH_TIMEOUT (seconds, default 480).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELHOUSE:-$REPO/bench/out/wheels}"
SITE="${GPU_BENCH_SITE:-/tmp/ovseg-gpu-site}"

missing="$("$PY" -c 'import importlib.util as u
mods = ("open_clip", "segment_anything", "numcodecs", "pydantic", "ftfy", "regex")
print(" ".join(m for m in mods if u.find_spec(m) is None))')"
if [ -n "$missing" ]; then
  if [ ! -f "$SITE/.ovseg-wheels" ]; then
    if [ ! -d "$WHEELS" ]; then
      echo "gpu.sh: $PY lacks: $missing; and there is no wheelhouse at $WHEELS" >&2
      echo "gpu.sh: run 'make wheelhouse' where pip reaches PyPI and bring bench/out/wheels along" >&2
      exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
      --target "$SITE" --find-links "$WHEELS" -r "$REPO/bench/gpu-requirements.txt"
    touch "$SITE/.ovseg-wheels"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout "${GPU_BENCH_TIMEOUT:-480}" "$PY" "$REPO/bench/gpu.py" "$@"
