"""Multistep latent-consistency sampling as a Gaussian policy (RLCM, Oertell et al. 2024,
https://arxiv.org/abs/2404.03673; LCM, Luo et al. 2023, https://arxiv.org/abs/2310.04378).

Notation (as diffusers' ``LCMScheduler.step``):
    alpha_prod_t, alpha_prod_t_prev -> a_t, a_{t'}   cumulative alphas at this and the next step
    c_skip, c_out                   -> consistency boundary scalings at t (sigma_data = 0.5)

One step:
    x0_hat   = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)         (eps-prediction)
    f(x_t)   = c_out * x0_hat + c_skip * x_t                       the consistency function
    x_{t'}   ~ N(sqrt(a_{t'}) f(x_t), (1 - a_{t'}) I)             re-noising: the policy step
The last step outputs f(x_t) deterministically (log-prob NaN, not trained), as RLCM does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction


class LCMSampler(ChainSampler):
    """LCM multistep sampling over an ``LCMScheduler`` config's timesteps.

    Args:
        scheduler_config: the pipeline's ``LCMScheduler`` config.
        num_steps: K (LCM: 2-8).
        logprob_reduction: ``"mean"`` or ``"sum"``.
    """

    name = "lcm"

    def __init__(self, scheduler_config: dict, num_steps: int = 4, logprob_reduction: str = "mean"):
        from diffusers import LCMScheduler

        if num_steps < 2:
            raise ValueError(
                f"sampler.num_steps must be >= 2 for LCM (one step has no stochastic transition), got {num_steps}"
            )
        check_reduction(logprob_reduction)
        scheduler = LCMScheduler.from_config(dict(scheduler_config))
        if scheduler.config.thresholding:
            raise ValueError("LCM with dynamic thresholding has no Gaussian step; set thresholding=False")
        scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.config = scheduler.config
        self.num_steps = num_steps
        self.logprob_reduction = logprob_reduction
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.timesteps = scheduler.timesteps.clone().long()  # (K,)
        # the step after the last is marked -1: deterministic output f(x_t)
        self.next_timesteps = torch.cat([self.timesteps[1:], torch.tensor([-1])])
        self.model_timesteps = self.timesteps

    def _alpha(self, t: Tensor) -> Tensor:
        t = t.long().cpu()
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, a, torch.full_like(a, self.final_alpha_cumprod))

    def step(
        self,
        model_output: Tensor,
        t: Tensor,
        next_t: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """One consistency step; ``next_t`` (B,) = -1 marks the final, deterministic step."""
        out, x = model_output.float(), sample.float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        a_t = self._alpha(t).to(x.device).view(shape)
        # 1. boundary scalings c_skip, c_out at t
        scaled = t.float().to(x.device).view(shape) * self.config.timestep_scaling
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25).sqrt()
        # 2. x0_hat from the model output
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        elif self.prediction_type == "sample":
            x0 = out
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        # 3. the consistency function
        denoised = c_out * x0 + c_skip * x
        # 4. re-noise to t' (the Gaussian policy), or stop at the final step
        final = (next_t < 0).to(x.device).view(shape)
        a_next = self._alpha(next_t).to(x.device).view(shape)
        mean = torch.where(final, denoised, a_next.sqrt() * denoised)
        std = torch.where(final, torch.zeros_like(a_next), (1 - a_next).sqrt())
        if prev_sample is None:
            if noise is None:
                noise = randn(x.shape, generator, x.device)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, safe_std, self.logprob_reduction)
        log_prob = torch.where(final.flatten(), torch.full_like(log_prob, float("nan")), log_prob)
        return StepOutput(prev_sample, mean, std, log_prob, denoised)

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
        """Step k (B,) of the consistency chain (re-noising always; the last step is deterministic)."""
        return self.step(
            model_output, self.timesteps[k], self.next_timesteps[k], sample, prev_sample, generator, noise
        )


def from_config(sc, adapter, evaluation: bool = False) -> LCMSampler:
    """A task's LCM chain (its evaluation stays seeded-stochastic, over ``eval_num_steps``)."""
    steps = (sc.eval_num_steps or sc.num_steps) if evaluation else sc.num_steps
    return LCMSampler(adapter.scheduler_config, steps, sc.logprob_reduction)
