"""Reward gained per extra network evaluation (NFE) for each guidance method at about equal
compute, against best-of-N with N = 4 as the reference, in one process.

Model: a tiny random pixel-space text-conditional UNet (flowrl.models.tiny), 16x16 RGB, DDIM
eta 1 with K steps; reward: mean brightness (cheap, known, differentiable). RL guidance needs a
fine-tune: a LoRA trained for 20 reward-gradient steps toward brightness (as in
tests/test_guidance.py), mixed at w = 2.

Robot section (``--section robot``): tiny random policies over action chunks (Hopper-sized:
Do 11, Da 3, Ta 4), DPPO's DDPM policy (T = 20, the last 10 fine-tuned) and ReinFlow's flow policy
(K = 4), on 64 random observations; reward: -||a - target||^2 (cheap, known, differentiable). RL
guidance mixes the policy with a copy behavior-cloned 40 steps toward the target, at w = 2. With
``--pendulum`` also the evaluation return on InvertedPendulum-v5 of the task's BC policies
(pre-trained here first, about a minute each) with best-of-4 / SMC-4 chunks scored by their
simulated return (one-chunk lookahead).

    python bench/bench_guidance.py [--section all|images|robot] [--steps 8] [--prompts 8] [--seeds 3] [--pendulum]
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
    p.add_argument("--section", choices=["all", "images", "robot"], default="all")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--pendulum", action="store_true", help="robot: also InvertedPendulum-v5 evaluation returns"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.section in ("all", "images"):
        images(args)
    if args.section in ("all", "robot"):
        robot(args.seeds)
        if args.pendulum:
            pendulum()


def images(args: argparse.Namespace) -> None:
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
    results = run_methods(methods, args.seeds)
    report(
        f"tiny pixel UNet, DDIM eta 1, K={K}, {args.prompts} prompts x {args.seeds} seeds, reward = brightness",
        results,
    )
    print("(RL guidance's cost excludes its fine-tune; reward-grad counts a backward as 2 NFE)")


def run_methods(methods: dict, seeds: int) -> dict:
    """name -> (mean reward over seeds, NFE per sample, seconds per run)."""
    results = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        runs = [fn(s) for s in range(seeds)]
        results[name] = (
            torch.cat([r for r, _ in runs]).mean().item(),
            runs[0][1],
            (time.perf_counter() - t0) / seeds,
        )
    return results


def report(title: str, results: dict, unit: str = "img") -> None:
    r0, nfe0, _ = results["unguided"]
    ref_gain, ref_nfe, _ = results["best-of-4"]
    ref_eff = (ref_gain - r0) / (ref_nfe - nfe0)
    print(title)
    print(
        f"{'method':18s} {'NFE/' + unit:>9s} {'reward':>8s} {'gain':>8s} {'gain/extra NFE':>15s} {'vs best-of-4':>13s} {'s/run':>7s}"
    )
    for name, (r, nfe, sec) in results.items():
        extra = nfe - nfe0
        eff = (r - r0) / extra if extra > 0 else float("nan")
        print(
            f"{name:18s} {nfe:9.0f} {r:8.4f} {r - r0:+8.4f} {eff:15.2e} {eff / ref_eff if extra > 0 else float('nan'):13.2f} {sec:7.2f}"
        )


def robot(seeds: int) -> None:
    from flowrl.guidance.actions import target_reward

    target = [0.5, -0.5, 0.25]
    obs = torch.randn(64, 1, 11, generator=torch.Generator().manual_seed(123))
    for kind in ("diffusion", "flow"):
        robot_table(kind, obs, target_reward(target), target, seeds)
    print("(mean path for all but SMC, and best-of-4 on the DDPM policy, which sample every step)")


def robot_table(kind: str, obs: torch.Tensor, reward, target: list[float], seeds: int) -> None:
    from flowrl.guidance import ChunkReward, GuidedSampler, RLGuidedAdapter
    from flowrl.models.policy import DiffusionPolicy, FlowPolicy
    from flowrl.samplers.ddpm_policy import DDPMPolicySampler
    from flowrl.samplers.reinflow import ReinFlowSampler

    dims = dict(obs_dim=11, action_dim=3, obs_horizon=1, action_horizon=4, hidden_dims=[64, 64])
    torch.manual_seed(0)
    if kind == "diffusion":
        policy, sampler = DiffusionPolicy(**dims, num_train_steps=20), DDPMPolicySampler(20, 10, 0.1)
    else:
        policy, sampler = FlowPolicy(**dims), ReinFlowSampler(4)
    tuned = copy.deepcopy(policy)  # a fine-tune toward the target: 40 BC steps on the target chunk
    if kind == "diffusion":
        tuned.freeze_reference()
    opt = torch.optim.Adam(tuned.net.parameters(), lr=1e-2)
    goal = policy.normalizer.normalize_action(torch.tensor(target)).expand(len(obs), 4, 3)
    for i in range(40):
        loss = tuned.bc_loss(policy.normalizer.normalize_obs(obs), goal, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    K = sampler.num_steps

    def plain(p, nfe_per_step):
        def fn(seed):
            chain = sampler.sample(p, obs, generator=torch.Generator().manual_seed(seed), deterministic=True)
            return reward(obs, p.decode(chain.latents[:, -1])), float(nfe_per_step * K)

        return fn

    def guided(method, **options):
        def fn(seed):
            r = GuidedSampler(sampler, method, ChunkReward(reward), **options).guide(
                policy, obs, torch.Generator().manual_seed(seed)
            )
            return r.rewards, r.nfe

        return fn

    results = run_methods(
        {
            "unguided": plain(policy, 1),
            "best-of-4": guided("best-of-n", n=4),
            "smc-4": guided("smc", num_particles=4, lam=10.0),
            "reward-grad": guided("reward-grad", scale=0.2),
            "rl-guidance w=2": plain(RLGuidedAdapter(tuned, 2.0, base=policy), 2),
        },
        seeds,
    )
    name = "DDPM (DPPO), T=20" if kind == "diffusion" else "flow (ReinFlow), K=4"
    report(
        f"\nrobot: tiny {name} policy, {len(obs)} observations x {seeds} seeds, reward = -||a - target||^2",
        results,
        unit="chunk",
    )


def pendulum(episodes: int = 8) -> None:
    import tempfile

    from flowrl.config import load_config
    from flowrl.envs.rollouts import evaluate
    from flowrl.guidance import ChunkReward, GuidedSampler
    from flowrl.guidance.actions import SimulatedReturn
    from flowrl.models.policy import load_policy
    from flowrl.pretrain import pretrain
    from flowrl.samplers import sampler_for

    reward = ChunkReward(
        SimulatedReturn("InvertedPendulum-v5", termination_penalty=10.0, state_cost=[0, 10, 0, 1])
    )
    with tempfile.TemporaryDirectory() as root:
        for task in ("robot_inverted_pendulum_dppo", "robot_inverted_pendulum_reinflow"):
            cfg = load_config(task, [f"train.output_dir={root}", "pretrain.eval_episodes=0"])
            policy = load_policy(pretrain(cfg, task, progress=False)["folder"])
            sampler = sampler_for(cfg, policy)
            print(f"\n{task}: BC policy, {episodes} evaluation episodes (seeds 0..{episodes - 1}), cap 1000")
            for name, s in (
                ("unguided", sampler),
                ("best-of-4", GuidedSampler(sampler, "best-of-n", reward, n=4)),
                ("smc-4", GuidedSampler(sampler, "smc", reward, num_particles=4, lam=1.0)),
            ):
                t0 = time.perf_counter()
                ev = evaluate(policy, s, cfg, episodes, seed=0)
                print(
                    f"{name:10s} return {ev['return_mean']:7.1f} +/- {ev['return_std']:6.1f}  ({time.perf_counter() - t0:.1f} s)"
                )


if __name__ == "__main__":
    main()
