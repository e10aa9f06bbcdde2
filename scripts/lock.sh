#!/usr/bin/env bash
# Refresh constraints.txt: resolve pyproject.toml's ranges afresh in a scratch venv and pin
# what it installed. Run scripts/test.sh afterwards; commit constraints.txt only if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "==> resolving the newest versions pyproject.toml allows (a few minutes)"
"$python" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --upgrade pip
"$scratch/venv/bin/python" -m pip install --quiet -e '.[dev]'
{
  echo "# Exact versions the test suite passed with (Linux x86_64, Python 3.11). scripts/setup.sh and CI"
  echo "# install with these as pip constraints; refresh with: bash scripts/lock.sh (then run scripts/test.sh)."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "==> wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages); now run: bash scripts/test.sh"
