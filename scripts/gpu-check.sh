#!/usr/bin/env bash
# GPU checks in one short run (scripts/gpu_check.py): the model tests on the device, inference
# latency and training throughput of the paper's HDM; a JSON and a Markdown summary under
# $OUT (or --out DIR, else .hdm/gpu-check). Needs only torch, torchvision, safetensors and
# torchmetrics next to this checkout's source.
#   bash scripts/gpu-check.sh                                        # on a CUDA machine (< 8 min)
#   bash scripts/gpu-check.sh --device cpu --quick --skip-compile    # anywhere, in seconds
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root:$root/platform${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
exec "$python" "$root/scripts/gpu_check.py" "$@"
