#!/usr/bin/env bash
# Set up (if needed) and run the embedded default: DDPO on JPEG compressibility with a tiny
# Stable Diffusion built from config, a few minutes on CPU, no download. Extra args are overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLOWRL_CACHE="${FLOWRL_CACHE:-$PWD/.cache}" HF_HUB_OFFLINE=1
flowrl train tasks/jpeg_tiny.yaml "train.run_name=jpeg_tiny-$(date +%Y%m%d-%H%M%S)" "$@"
