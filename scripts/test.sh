#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLOWRL_CACHE="${FLOWRL_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check flowrl tests rewards examples bench
python -m pytest -q --durations=10 "$@"
