#!/usr/bin/env bash
# The GPU check, ready for the GPU machine (one H100, no network; see README "GPU check"):
#
#   bench/gpu_wheels.sh                                       # here, once: wheels into bench/gpu_wheels/
#   run(command="bench/gpu_check.sh", carry=["bench/gpu_wheels"], timeout_s=540)
#   bench/gpu_check.sh --dry-run                              # here: the same on CPU at tiny sizes
#
# Installs every wheel of bench/gpu_wheels/ whose package the machine lacks into a private
# folder (never over the image's own packages), then runs bench/gpu_check.py under a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
LIMIT=${GPU_CHECK_LIMIT:-430}  # seconds: gpu_check.py prints its table by 400 s; install and start-up fit in 8 minutes

if compgen -G "bench/gpu_wheels/*.whl" >/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
  missing=$("$PY" - bench/gpu_wheels/*.whl <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for w in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", w.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        version(name)
    except PackageNotFoundError:
        print(w)
PY
)
  if [ -n "$missing" ]; then
    echo "installing $(echo "$missing" | wc -l) wheels into $SITE" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" $missing >&2 || {
      echo "pip install failed: unpacking the wheels instead (a wheel is a zip of its site-packages files)" >&2
      "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" $missing >&2 \
        || echo "some wheels could not be unpacked: their sections will say so" >&2
    }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "every wheel's package is already installed" >&2
  fi
else
  echo "no bench/gpu_wheels/*.whl (run bench/gpu_wheels.sh here and carry bench/gpu_wheels): sections needing them will say so" >&2
fi
exec timeout "$LIMIT" "$PY" bench/gpu_check.py "$@"
