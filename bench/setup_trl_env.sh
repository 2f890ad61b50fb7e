#!/usr/bin/env bash
# Create /work/main/.venv-trl: a separate venv with trl 0.11.4 (the last trl release with DDPOTrainer
# in this form) and the diffusers/transformers/peft of its time, for bench/bench_vs_trl.py.
#
# torch/torchvision are the same release as flowrl's venv (2.14.1 / 0.29.1, which pip takes from this
# machine's local disk); every later install runs under a constraints file that pins them, so no
# dependency can make pip fetch a different torch.
#
# Usage (from the repository root):  bash bench/setup_trl_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRL_VENV:-.venv-trl}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# A set that works with trl 0.11.4 (released Oct 2024), found by trying: trl's core.py imports
# transformers.TopKLogitsWarper (gone in transformers 5, so 4.x); trl.trainer.utils imports rich,
# which trl does not declare; its DDPO LoRA path calls unet.add_adapter (peft integration, diffusers
# >= 0.22). No diffusers with add_adapter lets trl 0.11.4 sample at guidance_scale <= 1 (see
# bench/_trl_ddpo_worker.py, install_cfg1_shim).
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<'EOF'
torch==2.14.1
torchvision==0.29.1
trl==0.11.4
transformers==4.46.3
tokenizers==0.20.3
diffusers==0.31.0
peft==0.13.2
accelerate==1.1.1
huggingface_hub==0.26.5
datasets==3.1.0
numpy==2.1.3
pillow==11.0.0
safetensors==0.4.5
rich==13.9.4
EOF

# torch first (local disk), then the rest, all under the same pins.
$PIP install -q -c "$CONSTRAINTS" torch torchvision
$PIP install -q -c "$CONSTRAINTS" trl transformers tokenizers diffusers peft accelerate huggingface_hub \
  datasets numpy pillow safetensors rich

# Fail loudly if anything replaced torch, and check that trl's DDPO pieces import.
"$VENV/bin/python" - <<'EOF'
import torch, trl, diffusers, transformers, peft, accelerate
assert torch.__version__.startswith("2.14.1"), torch.__version__
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401
print("trl env ok:", {m.__name__: m.__version__ for m in (torch, trl, diffusers, transformers, peft, accelerate)})
EOF
