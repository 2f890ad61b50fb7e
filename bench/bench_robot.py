"""Rollout throughput of chunked robot policies: environment steps per second with N envs and K
denoising steps, against the raw vectorized environment.

Both sides step the same vector env of N action-chunk envs (``flowrl.envs.wrappers``; a
``SyncVectorEnv``, or with ``--vectorization async`` an ``AsyncVectorEnv``):

    raw:     random action chunks (no policy)
    policy:  the stochastic sampler's chunk (what training rollouts do): ReinFlow with K flow
             steps plus its noise network, or DPPO's DDPM with T = 20 steps (the last 10 recorded)

Policies have random weights and the task's default network size ([256, 256] MLP); throughput
does not depend on the weights. Each setting runs for ``--seconds`` after one warm-up chunk.
One torch thread, as the trainer uses by default.

    python bench/bench_robot.py [--env InvertedDoublePendulum-v5] [--envs 1 8 32] [--steps 1 2 4]
    python bench/bench_robot.py --vectorization async    # one subprocess per env (env.vectorization)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _cpu_load import ForeignCPU, wait_for_quiet  # bench/ is on sys.path when run as a script


def rate(vec, seconds: float, action_steps: int, policy=None, sampler=None) -> float:
    """Environment steps per second (a chunk counts the actions it executed); random chunks when
    ``policy`` is None, else the stochastic sampler's."""
    from flowrl.envs.rollouts import act
    from flowrl.envs.wrappers import executed_steps

    low, high = vec.single_action_space.low, vec.single_action_space.high
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def chunk(obs):
        if policy is None:
            return rng.uniform(low, high, (len(obs), *low.shape)).astype(np.float32)
        return act(policy, sampler, obs, action_steps, gen, deterministic=False)[0]

    obs, _ = vec.reset(seed=list(range(vec.num_envs)))
    chunk(obs)  # warm-up
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        obs, _, term, trunc, info = vec.step(chunk(obs))
        steps += int(executed_steps(info, term | trunc).sum())
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="InvertedDoublePendulum-v5")
    ap.add_argument("--envs", type=int, nargs="+", default=[1, 8, 32], help="N, parallel environments")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="K, ReinFlow flow steps")
    ap.add_argument("--dppo", action="store_true", help="also DPPO's DDPM (T = 20, last 10 fine-tuned)")
    ap.add_argument("--action-steps", type=int, default=4, help="actions executed per chunk")
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--vectorization",
        choices=["sync", "async"],
        default="sync",
        help="env.vectorization: the envs in this process, or a subprocess each (AsyncVectorEnv)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gymnasium as gym

    from flowrl.envs.wrappers import make_vector_env
    from flowrl.models.policy import DiffusionPolicy, FlowPolicy
    from flowrl.samplers.ddpm_policy import DDPMPolicySampler
    from flowrl.samplers.reinflow import ReinFlowSampler

    probe = gym.make(args.env)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    low, high = probe.action_space.low, probe.action_space.high
    probe.close()
    dims = dict(obs_dim=obs_dim, action_dim=act_dim, obs_horizon=1, action_horizon=4, hidden_dims=args.hidden)
    torch.manual_seed(0)
    flow = FlowPolicy(**dims)
    flow.add_noise_net(0.05, 0.15, [64, 64])
    diffusion = DiffusionPolicy(**dims, num_train_steps=20)
    diffusion.freeze_reference()
    for p in (flow, diffusion):
        p.normalizer.action_low.copy_(torch.as_tensor(low))
        p.normalizer.action_high.copy_(torch.as_tensor(high))

    samplers = [(f"reinflow K={k}", flow, ReinFlowSampler(k), k) for k in args.steps]
    if args.dppo:
        samplers.append(("dppo T=20 (K=10)", diffusion, DDPMPolicySampler(20, 10, 0.1), 20))
    te = args.action_steps
    print(
        f"{args.env}, chunks of {te} actions, MLP {args.hidden}, {args.threads} torch thread(s), "
        f"{args.vectorization} vector env"
    )
    print(
        f"{'N':>4} {'sampler':>18} {'denoise steps':>14} {'env steps/s':>12} {'raw env steps/s':>16} {'policy / raw':>12}"
    )
    wait_for_quiet(timeout_s=60)
    with ForeignCPU() as busy:
        for n in args.envs:
            vec = make_vector_env(n, args.vectorization, env_id=args.env, obs_horizon=1, action_steps=te)
            raw = rate(vec, args.seconds, te)
            for name, policy, sampler, forwards in samplers:
                r = rate(vec, args.seconds, te, policy, sampler)
                print(
                    f"{n:>4} {name:>18} {forwards:>14} {r:>12.0f} {raw:>16.0f} {r / raw:>12.2f}", flush=True
                )
            vec.close()
    note = "  WARNING: timings disturbed, rerun on a quiet machine" if busy.cores > 0.3 else ""
    print(f"most CPU used by other processes while timing: {busy.cores:.2f} cores{note}")


if __name__ == "__main__":
    main()
