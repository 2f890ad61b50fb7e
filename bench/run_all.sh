#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md in one go, each script's output into bench/out/<name>.txt.
#   bash bench/run_all.sh           # the figures as in BENCHMARKS.md (roughly 45 minutes on 2 CPU
#                                   # cores: the sum of the scripts' own times, not timed as a whole)
#   bash bench/run_all.sh --quick   # fewer repetitions and points: a smoke run (9 minutes measured)
# Works on a GPU unchanged (the scripts pick CUDA when it is there). The trl comparison needs its
# own environment (bash bench/setup_trl_env.sh) and is skipped with a note when it is missing.
# Run it on an otherwise idle machine: each script reports the CPU other processes used.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p bench/out

run() {  # name, then the command
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "bench/out/$name.txt" | grep -v -e "it/s]" -e "s/it]" || true
    echo "   ($((SECONDS - t0)) s; output in bench/out/$name.txt)"
}

if ((quick)); then
    run sampler python bench/bench_sampler.py --reps 3 --warmup 1
    run train_step python bench/bench_train_step.py --reps 3 --warmup 1
    run onpolicy_fusion python bench/bench_onpolicy_fusion.py --reps 2
    run scaling python bench/bench_scaling.py --quick --epochs 1
    run robot python bench/bench_robot.py --envs 1 8 --steps 1 4 --dppo --action-steps 2 --seconds 1
    run robot_algos python bench/bench_robot_algos.py --iterations 3
    run guidance python bench/bench_guidance.py --prompts 4 --seeds 1
else
    run sampler python bench/bench_sampler.py --reps 9
    run train_step python bench/bench_train_step.py --reps 7
    run train_step_lora_compile python bench/bench_train_step.py --reps 5 --lora 4 --cfg 5 --compile
    run onpolicy_fusion python bench/bench_onpolicy_fusion.py
    run scaling python bench/bench_scaling.py
    run robot python bench/bench_robot.py --env InvertedDoublePendulum-v5 --envs 1 8 32 --steps 1 2 4 --dppo --action-steps 2 --seconds 3
    run robot_algos python bench/bench_robot_algos.py
    run guidance python bench/bench_guidance.py
fi
if [[ -x .venv-trl/bin/python ]]; then
    if ((quick)); then
        run vs_trl python bench/bench_vs_trl.py --rounds 1 --epochs 2 --guidance 5.0
    else
        run vs_trl python bench/bench_vs_trl.py
    fi
else
    echo "== vs_trl skipped: no .venv-trl (make it with: bash bench/setup_trl_env.sh)"
fi
echo "all outputs in bench/out/"
