"""What fusing the on-policy update into sampling could save: an upper bound, for the next lever.

The first optimizer step of a DDPO/GRPO epoch trains on trajectories that the very same
parameters sampled, so its PPO ratio is exactly 1 and its gradient is -A grad log p at the
sampled transitions. A trainer could take that gradient while sampling (one forward with grad
and its backward per denoising step) instead of an inference forward now and a forward+backward
in the update. The advantage A is known only after the reward, so a real implementation must
keep per-sample gradients of the trained weights until then (cheap for LoRA, not for full
fine-tuning); this bench leaves that bookkeeping out and times the network work of both ways
for one sampling batch of B trajectories x K steps (tiny SD, 32x32, DDIM eta 1, LoRA):

    separate   K inference forwards (sampling) + one forward+backward of all B x K pairs
               (flowrl's train.timestep_batch=0 update of that batch)
    fused      K forwards with grad, each followed by the backward of its log-probs

fused / separate is the floor of what fusion costs for the trajectories of the first optimizer
step; an epoch with U optimizer steps can fuse only 1/U of its update. Interleaved A B A B after
warmup, medians; other processes' CPU use is reported.

    python bench/bench_onpolicy_fusion.py [--steps 10] [--batch 8] [--cfg 5] [--lora 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="denoising steps K")
    ap.add_argument("--batch", type=int, default=8, help="trajectories B per sampling batch")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--lora", type=int, default=4, help="LoRA rank")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowrl.models import build_adapter, load_pipeline
    from flowrl.samplers import build_sampler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    adapter = build_adapter(load_pipeline("tiny", "sd"), "sd", "lora", args.lora).to(device)
    sampler = build_sampler("ddim", adapter.scheduler_config, args.steps, eta=1.0)
    prompts = ["a red square", "a green square", "a blue square", "a yellow square"] * (args.batch // 4 + 1)
    prompts = prompts[: args.batch]
    B, K = args.batch, args.steps
    chain = sampler.sample(adapter, prompts, args.cfg, generator=torch.Generator().manual_seed(0))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def separate() -> None:
        sampler.sample(adapter, prompts, args.cfg, generator=torch.Generator().manual_seed(1))
        steps, traj = torch.arange(K).repeat(B), torch.arange(B).repeat_interleave(K)  # (B * K,)
        sampler.log_prob(adapter, chain, steps, traj_index=traj).log_prob.mean().backward()
        adapter.denoiser.zero_grad(set_to_none=True)

    def fused() -> None:
        cond = adapter.condition(prompts, args.cfg)
        x = torch.randn((B, *adapter.latent_shape), generator=torch.Generator().manual_seed(1)).to(device)
        for k in range(K):
            kb = torch.full((B,), k, dtype=torch.long)
            out = adapter(x, sampler.model_timesteps[kb].to(device), cond, args.cfg)
            step = sampler.transition(kb, out, x)
            step.log_prob.mean().backward()
            x = step.prev_sample.detach()
        adapter.denoiser.zero_grad(set_to_none=True)

    runs = {"separate": separate, "fused": fused}
    times: dict[str, list[float]] = {name: [] for name in runs}
    foreign = []
    for rep in range(args.warmup + args.reps):
        wait_for_quiet(timeout_s=args.quiet_timeout)
        for name, fn in runs.items():
            with ForeignCPU() as f:
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[name].append(dt)
                foreign.append(f.cores)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"device {device}, B={B}, K={K}, CFG {args.cfg}, LoRA r{args.lora}, {args.reps} reps")
    print("| way | s per sampling batch (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, v in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(v):.3f} | {max(v):.3f} |")
    print(f"fused / separate = {med['fused'] / med['separate']:.3f}")
    print(f"most CPU used by other processes during a timed run: {max(foreign):.2f} cores")


if __name__ == "__main__":
    main()
