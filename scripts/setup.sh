#!/usr/bin/env bash
# Create .venv (once) and install flowrl with its test and robot extras, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB download
python -m pip install -q -c constraints.txt torch torchvision
python -m pip install -q -c constraints.txt -e ".[dev]"
