"""Reward gained per extra network evaluation (NFE) for each guidance method at about equal
compute, against best-of-N with N = 4 as the reference, in one process.

Model: a tiny random pixel-space text-conditional UNet (flowrl.models.tiny), 16x16 RGB, DDIM
eta 1 with K steps; reward: mean brightness (cheap, known, differentiable). RL guidance needs a
fine-tune: a LoRA trained for 20 reward-gradient steps toward brightness (as in
tests/test_guidance.py), mixed at w = 2.

    python bench/bench_guidance.py [--steps 8] [--prompts 8] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowrl.guidance import RLGuidedAdapter, best_of_n, reward_gradient_guidance, smc_guidance  # noqa: E402
from flowrl.models import StableDiffusionAdapter  # noqa: E402
from flowrl.models.tiny import build_tiny_pixel_pipeline  # noqa: E402
from flowrl.samplers import DDIMSampler  # noqa: E402


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3))


def finetune(pipe, steps: int = 20) -> StableDiffusionAdapter:
    adapter = StableDiffusionAdapter(copy.deepcopy(pipe), "lora", lora_rank=4)
    sampler = DDIMSampler(pipe.scheduler.config, 4, eta=0.0)
    opt = torch.optim.Adam(adapter.trainable_parameters(), lr=3e-2)
    prompts = ["x"] * 4
    cond = adapter.condition(prompts, 1.0)
    for i in range(steps):
        x = torch.randn(4, *adapter.latent_shape, generator=torch.Generator().manual_seed(100 + i))
        for k in range(4):
            kb = torch.full((4,), k)
            x = sampler.transition(
                kb, adapter(x, sampler.model_timesteps[kb], cond), x, stochastic=False
            ).prev_sample
        loss = -brightness(adapter.decode_latents(x), prompts).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    pipe = build_tiny_pixel_pipeline()
    base = StableDiffusionAdapter(copy.deepcopy(pipe), "frozen")
    tuned = finetune(pipe)
    sampler = DDIMSampler(pipe.scheduler.config, args.steps, eta=1.0)
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    K = args.steps

    def unguided(seed):
        chain = sampler.sample(base, prompts, generator=torch.Generator().manual_seed(seed))
        return brightness(base.decode(chain.latents[:, -1]), prompts), float(K)

    def rlg(seed):
        adapter = RLGuidedAdapter(tuned, 2.0)
        chain = sampler.sample(adapter, prompts, generator=torch.Generator().manual_seed(seed))
        return brightness(adapter.decode(chain.latents[:, -1]), prompts), float(2 * K)

    def grad(seed):
        r = reward_gradient_guidance(
            sampler, base, brightness, prompts, scale=0.1, generator=torch.Generator().manual_seed(seed)
        )
        return r.rewards, r.nfe

    def bon(seed):
        r = best_of_n(sampler, base, brightness, prompts, n=4, generator=torch.Generator().manual_seed(seed))
        return r.rewards, r.nfe

    def smc(seed):
        r = smc_guidance(
            sampler,
            base,
            brightness,
            prompts,
            num_particles=4,
            lam=100.0,
            generator=torch.Generator().manual_seed(seed),
        )
        return r.rewards, r.nfe

    methods = {
        "unguided": unguided,
        "best-of-4": bon,
        "smc-4": smc,
        "reward-grad": grad,
        "rl-guidance w=2": rlg,
    }
    results = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        runs = [fn(s) for s in range(args.seeds)]
        results[name] = (
            torch.cat([r for r, _ in runs]).mean().item(),
            runs[0][1],
            (time.perf_counter() - t0) / args.seeds,
        )
    r0, nfe0, _ = results["unguided"]
    ref_gain, ref_nfe, _ = results["best-of-4"]
    ref_eff = (ref_gain - r0) / (ref_nfe - nfe0)
    print(
        f"tiny pixel UNet, DDIM eta 1, K={K}, {args.prompts} prompts x {args.seeds} seeds, reward = brightness"
    )
    print(
        f"{'method':18s} {'NFE/img':>8s} {'reward':>8s} {'gain':>8s} {'gain/extra NFE':>15s} {'vs best-of-4':>13s} {'s/run':>7s}"
    )
    for name, (r, nfe, sec) in results.items():
        extra = nfe - nfe0
        eff = (r - r0) / extra if extra > 0 else float("nan")
        print(
            f"{name:18s} {nfe:8.0f} {r:8.4f} {r - r0:+8.4f} {eff:15.2e} {eff / ref_eff if extra > 0 else float('nan'):13.2f} {sec:7.2f}"
        )
    print("(RL guidance's cost excludes its fine-tune; reward-grad counts a backward as 2 NFE)")


if __name__ == "__main__":
    main()
