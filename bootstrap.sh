#!/usr/bin/env bash
# Idempotent setup for a fresh clone: the system tools the tests use (espeak-ng, sox), a virtual
# environment in .venv, and the project with its pinned dependency set. Re-running is instant
# unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
for tool in espeak-ng sox; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[bootstrap] apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  # A fresh venv is 8.6 GB (torch, its CUDA libraries and triton 6.3): pip would stop part-way with ENOSPC.
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 9 ]; then
    echo "[bootstrap] the virtual environment needs about 9 GB free here ($(pwd)), there are ${free_gb} GB" >&2
    exit 1
  fi
  "${PYTHON:-python3}" -m venv .venv
fi
want=$(cat pyproject.toml constraints.txt bootstrap.sh | sha1sum | cut -c1-16)
if [ "$(cat .venv/.csm-corpus-installed 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dependencies into .venv (first time: ~5 min, ~8.5 GB)" >&2
  .venv/bin/pip install -q --upgrade pip
  # compat: the checkout itself goes on sys.path, so packages added later import without a reinstall
  .venv/bin/pip install -q -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
  echo "$want" > .venv/.csm-corpus-installed
fi
