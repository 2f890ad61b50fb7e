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

    mu      = clip(x_{t_k} + dt * v_theta(x_{t_k}, t_k, s), -c, c)      c = denoised_clip (ReinFlow: 1)
    x_{t_{k+1}} = mu + sigma_theta'(t_k, s) * clip(z, -noise_clip, noise_clip),  z ~ N(0, I)
    the last step's x_1 is clipped to [-c, c] as well (ReinFlow's act_min / act_max)

and a transition's log-prob is log N(x_{t_{k+1}}; mu, sigma^2 I) of the recorded state, as ReinFlow's
code evaluates it (its clips make the true density differ at the clipped points; the objective's
``chain_logprob`` adds log N(x_0; 0, I) and divides by K + 1, as ReinFlow does). With the noise off
(std 0) it is the K-step Euler sampler (with the clips), used for evaluation.

The std is part of the model's prediction: :meth:`ReinFlowSampler.predict` asks the policy for
its velocity and its noise network's std at (x_t, t, s), so the learned std is the one used
wherever the sampler runs (training, evaluation, guidance). A policy without a noise network (a
BC policy, stochastically guided) takes the fixed ``fixed_std``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction


class ReinFlowSampler(ChainSampler):
    """K Euler steps of a flow policy from noise (t = 0) to the action chunk (t = 1), each a
    Gaussian with the std of the policy's noise network.

    Args:
        num_steps: K, flow steps per action chunk (ReinFlow: 1 to 4).
        logprob_reduction: ``"mean"`` or ``"sum"`` over the (Ta, Da) chunk (see ``reduce_event``).
        fixed_std: the std of every stochastic step when it is not learned: for ``euler``, and for
            a policy without a noise network (a BC policy, stochastically guided).
        learned: the std comes from the policy's noise network (ReinFlow); False (``euler``):
            every step has the fixed std, 0 being the plain ODE whose exploration comes from x_0
            alone (objectives that need no per-step likelihood, such as FPO; a fixed std > 0 is
            FPO's optional ``sde_sigma``).
        denoised_clip: c, the clip of each step's mean and of the final action (ReinFlow's
            denoised_clip_value 1, the normalized action range); null: none (the ``euler`` default).
        noise_clip: clip of the drawn N(0, I) noise (ReinFlow's randn_clip_value 3); null: none.
    """

    prediction_type = "velocity"

    def __init__(
        self,
        num_steps: int = 4,
        logprob_reduction: str = "mean",
        fixed_std: float = 0.1,
        learned: bool = True,
        denoised_clip: float | None = None,
        noise_clip: float | None = None,
    ):
        if num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
        check_reduction(logprob_reduction)
        self.num_steps = num_steps
        self.logprob_reduction = logprob_reduction
        if fixed_std < 0:
            raise ValueError(f"sampler.noise_std must be >= 0, got {fixed_std}")
        self.fixed_std = fixed_std
        for key, value in (("denoised_clip", denoised_clip), ("noise_clip", noise_clip)):
            if value is not None and value <= 0:
                raise ValueError(f"sampler.{key} must be > 0 or null, got {value}")
        self.denoised_clip, self.noise_clip = denoised_clip, noise_clip
        self.learned = learned
        self.name = "reinflow" if learned else "euler"
        self.timesteps = torch.arange(num_steps + 1, dtype=torch.float32) / num_steps  # (K+1,) 0 .. 1
        self.model_timesteps, self.next_timesteps = self.timesteps[:-1], self.timesteps[1:]  # (K,) each

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
                (its log-prob is then NaN; its noise is drawn all the same).
            t, next_t: (B,) the flow times t_k and t_{k+1}.
            sample: (B, Ta, Da) x_{t_k}.
            prev_sample: (B, Ta, Da) x_{t_{k+1}} to evaluate (the state the step lands on); drawn if None.
            generator / noise: randomness for drawing x_{t_{k+1}} (noise ~ N(0, I) given directly).
        """
        velocity, sample, std = velocity.float(), sample.float(), std.float()
        shape = (-1,) + (1,) * (sample.ndim - 1)
        t, dt = t.float().view(shape), (next_t - t).float().view(shape)
        # 1. the Euler step of the flow ODE is the mean, clipped to the action range (ReinFlow)
        c = self.denoised_clip
        mean = sample + dt * velocity
        if c is not None:
            mean = mean.clamp(-c, c)
        # 2. the one-step estimate of the action chunk x_1 from here (for inspection and guidance)
        pred_original = sample + (1 - t) * velocity
        # 3. draw x_{t_{k+1}} ~ N(mu, sigma^2 I) unless given
        if prev_sample is None:
            if noise is None:
                noise = randn(sample.shape, generator, sample.device)
            if self.noise_clip is not None:
                noise = noise.clamp(-self.noise_clip, self.noise_clip)
            prev_sample = mean + std * noise
            if c is not None:  # the action chunk itself stays in range (ReinFlow's last-step clamp)
                prev_sample = torch.where((next_t >= 1).view(shape), prev_sample.clamp(-c, c), prev_sample)
        prev_sample = prev_sample.float()
        # 4. log N(x_{t_{k+1}}; mu, sigma^2 I), reduced over the chunk (NaN for the deterministic step)
        if (std == 0).all():
            log_prob = torch.full(sample.shape[:1], float("nan"), device=sample.device)
        else:
            log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, self.logprob_reduction)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)

    # ------------------------------------------------------------------ the chain
    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        return set(range(self.num_steps)) if self.learned or self.fixed_std > 0 else set()

    def predict(self, adapter, x, k, cond, guidance_scale=1.0, reference=False, stochastic=True):
        """(velocity, std) at step k: the policy's velocity and, for a stochastic step, its noise
        network's std (``fixed_std`` without one); None on a mean-path step."""
        t = self.model_timesteps[k.cpu()].to(x.device, non_blocking=True)
        cond = with_step_size(adapter, cond, t, self.num_steps)
        v = adapter.reference_forward(x, t, cond) if reference else adapter(x, t, cond)
        if not stochastic:
            return v, None
        if not self.learned or getattr(adapter, "noise_net", None) is None:
            return v, torch.full_like(v, self.fixed_std)
        return v, adapter.noise_std(t, cond)

    def transition(
        self,
        k,
        model_output,
        sample,
        cond=None,
        prev_sample=None,
        generator=None,
        noise=None,
        stochastic=True,
    ) -> StepOutput:
        """Step k (B,): the Euler step from t_k to t_{k+1} with the predicted std (0 when not stochastic)."""
        velocity, std = model_output
        if std is None or not stochastic:
            std = torch.zeros_like(velocity)
        t = self.model_timesteps[k.cpu()].to(sample.device)
        next_t = self.next_timesteps[k.cpu()].to(sample.device)
        return self.step(velocity, std, t, next_t, sample, prev_sample, generator, noise)

    # ------------------------------------------------------------------ the forward process
    def denoising_loss(self, adapter, x0, cond, k, noise, guidance_scale=1.0, target="eps") -> Tensor:
        """(B,) the conditional flow-matching loss of the action chunk x0 (here x_1, the data end)
        at the flow time t = t_k of step k:

            x_t = t x_1 + (1 - t) eps,   v_theta(x_t, t, s) ~ x_1 - eps   (Liu et al. 2022)

        ``target="eps"``: mean (eps - eps_hat)^2 with eps_hat = x_t - t v_theta, the noise the
        velocity implies (FPO's default); ``"model"``: mean (v_theta - (x_1 - eps))^2."""
        x1, noise = x0.float(), noise.float()
        shape = (-1,) + (1,) * (x1.ndim - 1)
        t = self.model_timesteps[k.cpu()].to(x1.device)
        tt = t.view(shape)
        x_t = tt * x1 + (1 - tt) * noise
        v = adapter(x_t, t, cond).float()
        err = noise - (x_t - tt * v) if target == "eps" else v - (x1 - noise)
        return err.pow(2).mean(dim=tuple(range(1, x1.ndim)))


def with_step_size(adapter, cond: dict, t: Tensor, num_steps: int) -> dict:
    """``cond`` with a shortcut policy's step size d = 1/K (ReinFlow's PPOShortCut) for every row;
    ``cond`` itself for a policy that does not read d."""
    if not getattr(adapter, "takes_step_size", False):
        return cond
    return {**cond, "step_size": torch.full_like(t, 1.0 / num_steps)}


def from_config(sc, adapter, evaluation: bool = False) -> ReinFlowSampler:
    """A task's ReinFlow chain (learned noise) or Euler chain with a fixed std (``sampler.name:
    euler``, ``sampler.noise_std``; 0 = the ODE). A shortcut policy's d = 1/K must be on its grid."""
    if getattr(adapter, "takes_step_size", False):
        adapter.check_num_steps(sc.num_steps)
    if sc.name == "euler":
        return ReinFlowSampler(sc.num_steps, sc.logprob_reduction, fixed_std=sc.noise_std, learned=False)
    return ReinFlowSampler(
        sc.num_steps, sc.logprob_reduction, denoised_clip=sc.denoised_clip, noise_clip=sc.noise_clip
    )
