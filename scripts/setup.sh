#!/usr/bin/env bash
# Create .venv and install the project with its dev extras at the versions constraints.txt
# pins (the ones the suite passed with); a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $python"
  "$python" -m venv .venv
fi
stamp=.venv/.hdm-install-stamp
wanted=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "==> installing the project into .venv (torch comes from this machine's pip; a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --constraint constraints.txt -e '.[dev]'
  echo "$wanted" > "$stamp"
fi
