#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU, one pytest-xdist worker per core (at most 4;
# FLOWRL_TEST_WORKERS=N to choose, 0 for one process). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLOWRL_CACHE="${FLOWRL_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check flowrl tests rewards examples bench
workers=${FLOWRL_TEST_WORKERS:-$(python -c "import os; print(min(len(os.sched_getaffinity(0)), 4))")}
python -m pytest -q --durations=10 -n "$workers" "$@"
