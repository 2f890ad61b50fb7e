"""A flow-matching policy with a learned, bounded noise per step (ReinFlow, Zhang et al. 2025,
https://arxiv.org/abs/2505.22094).

Shapes:  B  environments (one action chunk each)   Ta  action horizon   Da  action dim
         To  observation history                   Do  observation dim  K   flow steps (1 to 4)

Notation (rectified flow, Liu et al. 2022, https://arxiv.org/abs/2209.03003; ReinFlow):

    velocity      -> v_theta(x_t, t, s)   the flow policy's velocity, t in [0, 1], x_0 ~ N(0, I) noise,
                                          x_1 the action chunk
    std           -> sigma_theta'(t, s)   the noise network's std, squashed into [sigma_min, sigma_max]
    t_k = k / K, dt = 1 / K

One step from x_{t_k} to x_{t_{k+1}}: the deterministic Euler step of dx/dt = v is the mean, and
the noise network's std makes it a Gaussian transition (ReinFlow's noise-injected step):

    mu      = x_{t_k} + dt * v_theta(x_{t_k}, t_k, s)
    x_{t_{k+1}} ~ N(mu, sigma_theta'(t_k, s)^2 I)

so the chain x_0 -> x_1 is a Markov chain whose log-likelihood is a sum of Gaussian log-densities
(log p(x_0) = log N(x_0; 0, I) does not depend on the parameters and is left out). With the noise
off (std 0) it is the plain K-step Euler sampler, used for evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.samplers.base import LOGPROB_REDUCTIONS, StepOutput, gaussian_log_prob, randn


class ReinFlowSampler:
    """K Euler steps of a flow policy from noise (t = 0) to the action chunk (t = 1), each a
    Gaussian with the std of the policy's noise network.

    Args:
        num_steps: K, flow steps per action chunk (ReinFlow: 1 to 4).
        logprob_reduction: ``"mean"`` or ``"sum"`` over the (Ta, Da) chunk (see ``reduce_event``).
    """

    def __init__(self, num_steps: int = 4, logprob_reduction: str = "mean"):
        if num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
        if logprob_reduction not in LOGPROB_REDUCTIONS:
            raise ValueError(
                f"logprob_reduction must be one of {LOGPROB_REDUCTIONS}, got {logprob_reduction!r}"
            )
        self.num_steps = num_steps
        self.logprob_reduction = logprob_reduction
        self.timesteps = torch.arange(num_steps + 1, dtype=torch.float32) / num_steps  # (K+1,) 0 .. 1

    # ------------------------------------------------------------------ one step
    def step(
        self,
        velocity: Tensor,
        std: Tensor,
        t: Tensor,
        next_t: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """One transition x_{t_k} -> x_{t_{k+1}}, float32.

        Args:
            velocity: (B, Ta, Da) v_theta(x_t, t, s).
            std: (B, Ta, Da) or broadcastable, the step's std; all zeros for the deterministic step
                (its log-prob is then NaN).
            t, next_t: (B,) the flow times t_k and t_{k+1}.
            sample: (B, Ta, Da) x_{t_k}.
            prev_sample: (B, Ta, Da) x_{t_{k+1}} to evaluate (the state the step lands on); drawn if None.
            generator / noise: randomness for drawing x_{t_{k+1}} (noise ~ N(0, I) given directly).
        """
        velocity, sample, std = velocity.float(), sample.float(), std.float()
        shape = (-1,) + (1,) * (sample.ndim - 1)
        t, dt = t.float().view(shape), (next_t - t).float().view(shape)
        # 1. the Euler step of the flow ODE is the mean
        mean = sample + dt * velocity
        # 2. the one-step estimate of the action chunk x_1 from here (for inspection)
        pred_original = sample + (1 - t) * velocity
        # 3. draw x_{t_{k+1}} ~ N(mu, sigma^2 I) unless given
        if prev_sample is None:
            if noise is None:
                noise = randn(sample.shape, generator, sample.device)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        # 4. log N(x_{t_{k+1}}; mu, sigma^2 I), reduced over the chunk (NaN for the deterministic step)
        if (std == 0).all():
            log_prob = torch.full(sample.shape[:1], float("nan"), device=sample.device)
        else:
            log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, self.logprob_reduction)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)

    # ------------------------------------------------------------------ whole chain
    @torch.no_grad()
    def sample(
        self,
        policy,
        obs: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Chain:
        """One action chunk per observation history ``obs`` (B, To, Do), every step recorded:
        ``latents`` (B, K+1, Ta, Da) with ``latents[:, -1]`` the chunk (normalized; clip it to
        [-1, 1] before executing), ``timesteps`` / ``next_timesteps`` (B, K) the flow times t_k and
        t_{k+1}, ``log_probs`` (B, K) (NaN when ``deterministic``), ``cond = {"obs": obs}``."""
        B = obs.shape[0]
        x = randn((B, *policy.action_shape), generator, obs.device)
        times = self.timesteps.to(obs.device)
        states, log_probs = [x], []
        for k in range(self.num_steps):
            t, next_t = times[k].expand(B), times[k + 1].expand(B)
            v = policy(x, t, obs)
            std = torch.zeros_like(x) if deterministic else policy.noise_std(t, obs)
            step = self.step(v, std, t, next_t, x, generator=generator)
            x = step.prev_sample
            states.append(x)
            log_probs.append(step.log_prob)
        return Chain(
            latents=torch.stack(states, dim=1),  # (B, K+1, Ta, Da)
            timesteps=times[:-1].expand(B, -1).clone(),  # (B, K)
            next_timesteps=times[1:].expand(B, -1).clone(),  # (B, K)
            log_probs=torch.stack(log_probs, dim=1),  # (B, K)
            cond={"obs": obs},
            prompts=[""] * B,
        )

    def log_prob(self, policy, chain: Chain, step_index: Tensor) -> StepOutput:
        """Re-evaluate transition ``step_index[b]`` (B,) of each trajectory under the policy's
        current velocity and noise networks, differentiably."""
        b = torch.arange(len(chain), device=chain.latents.device)
        step_index = step_index.to(chain.latents.device)
        x_t = chain.latents[b, step_index]  # (B, Ta, Da)
        x_next = chain.latents[b, step_index + 1]  # (B, Ta, Da)
        t = chain.timesteps[b, step_index]  # (B,)
        next_t = chain.next_timesteps[b, step_index]  # (B,)
        obs = chain.cond["obs"]
        return self.step(policy(x_t, t, obs), policy.noise_std(t, obs), t, next_t, x_t, prev_sample=x_next)
