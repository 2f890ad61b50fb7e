#!/usr/bin/env bash
# Set up (if needed) and run the embedded default: `flowrl quickstart`, DDPO on the prompt
# alignment of a tiny text-to-image model of handwritten digits (weights shipped in the package,
# no download), a few minutes on 2 CPU cores. Writes a report folder under runs/.
# Extra args go to `flowrl quickstart` (e.g. --epochs 10 --seed 1 --out runs/qs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLOWRL_CACHE="${FLOWRL_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
flowrl quickstart "$@"
