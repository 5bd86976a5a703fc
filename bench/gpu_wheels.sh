#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_check.sh installs on the GPU machine (Python 3.12, x86-64,
# no network there), into bench/gpu_wheels/ (git-ignored: never commit it), plus a slim copy of the
# offline diarizer's segmentation checkpoint (weights and hyper-parameters only, no optimizer state).
# Prints the total; tree plus this folder must stay under 64 MiB (the run tool's limit).
#
#   bench/gpu_wheels.sh            # then: run(command="bench/gpu_check.sh", carry=["bench/gpu_wheels"])
#
# Versions are the ones this project's venv resolved together (reference.md section 4), except
# torchaudio, which must match the machine's PyTorch 2.11. Left out, too big for the budget:
# resemblyzer's mel front end (librosa -> numba + llvmlite, ~45 MB): the check says so.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/gpu_wheels
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # no stale versions: the folder holds exactly this list

WHEELS=(
  # Mimi
  moshi==0.2.13 einops==0.8.2 sentencepiece==0.2.3
  # the trainer's data module imports webdataset
  webdataset==1.0.2 braceexpand==0.1.7
  # pyannote.audio and what its import chain needs beyond the image (torch, lightning, torchmetrics, scipy, pandas, transformers)
  pyannote.audio==4.0.7 pyannote.core==6.1.0 pyannote.database==6.1.1 pyannote.metrics==4.2.0
  pyannote.pipeline==4.1.0 pyannoteai-sdk==0.4.0 asteroid-filterbanks==0.4.0 torch-audiomentations==0.12.0
  julius==0.2.8 torch-pitch-shift==1.2.5 primePy==1.3 pytorch-metric-learning==2.9.0 torchaudio==2.11.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-proto==1.45.2 opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  googleapis-common-protos==1.76.0
  optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0 sortedcontainers==2.4.0
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
  scikit-learn==1.9.1 joblib==1.6.0 cloudpickle==3.1.2 threadpoolctl==3.8.0 narwhals==2.29.0
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --dest "$DEST" "${WHEELS[@]}"

"$PY" - "$DEST/segmentation.ckpt" <<'PY'
import os, sys, torch, whisperx
src = os.path.join(os.path.dirname(whisperx.__file__), "assets", "pytorch_model.bin")
ckpt = torch.load(src, map_location="cpu", weights_only=False)
keep = ("state_dict", "hyper_parameters", "hparams_name", "pyannote.audio", "pytorch-lightning_version", "epoch", "global_step")
torch.save({k: ckpt[k] for k in keep if k in ckpt}, sys.argv[1])
PY

tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb "$DEST" | tail -1 | cut -f1)
ls -S "$DEST" | head -5 | sed 's/^/  largest: /'
echo "wheels+checkpoint: $((wheels / 1024)) KiB, tree: $((tree / 1024)) KiB, total $(((wheels + tree) / 1048576)) MiB of 64 MiB"
[ $((wheels + tree)) -lt $((64 * 1048576)) ] || { echo "over the 64 MiB budget" >&2; exit 1; }
