"""DDIM over a diffusion policy's DDPM schedule, DPPO's DDIM fine-tuning (Ren et al. 2024,
https://arxiv.org/abs/2409.00588; ``irom-lab/dppo``: ``model/diffusion/diffusion.py`` (the DDIM
tables), ``model/diffusion/diffusion_vpg.py`` (``p_mean_var``, ``forward``, ``get_logprobs``),
``cfg/robomimic/finetune/*/ft_ppo_diffusion_unet_img.yaml`` (``use_ddim: True``)).

Shapes:  B  environments   Ta  action horizon   Da  action dim   S  DDIM steps   K  fine-tuned steps

A policy pre-trained with T DDPM steps (cosine schedule, :mod:`flowrl.samplers.ddpm_policy`)
samples with S < T DDIM steps at DPPO's "uniform" (diffusers' "leading") timesteps
tau_i = i * (T // S), run from i = S - 1 down to 0. With a = alphas_cumprod[tau_i] and
a' = alphas_cumprod[tau_{i-1}] (1 at i = 0), DDIM (Song et al. 2021, eq. 12) with eta:

    x0_hat = clip((x - sqrt(1 - a) eps_hat) / sqrt(a), -c, c)
    eps    = (x - sqrt(a) x0_hat) / sqrt(1 - a)             eps re-derived from the clipped x0_hat (DPPO)
    sigma  = max(eta sqrt((1 - a') / (1 - a) (1 - a / a')), 1e-10)
    mu     = sqrt(a') x0_hat + sqrt(max(1 - a' - sigma^2, 0)) eps
    x'     = mu + max(sigma, sigma_min) clip(z, -z_max, z_max)     z ~ N(0, I)
    log-prob: log N(x'; mu, max(sigma, sigma_min)^2 I)          (DPPO's two floors, both sampler.min_std)

DPPO's eta is a fixed 1 by default (``EtaFixed``; its learned eta is not implemented). Only the
last K of the S steps are fine-tuned and recorded (``index >= S - K`` in DPPO); the first S - K
run the frozen pre-trained network. Evaluation (``stochastic=False``) is DDIM with std 0, as
DPPO's deterministic forward.
"""

from __future__ import annotations

import torch

from flowrl.samplers.base import StepOutput
from flowrl.samplers.ddpm_policy import DDPMPolicySampler


class DDIMPolicySampler(DDPMPolicySampler):
    """S DDIM steps over a diffusion policy's T-step DDPM schedule, the last ``ft_steps`` an MDP.

    Args:
        num_train_steps: T, the DDPM steps of pre-training (DPPO: 100 for robomimic).
        ddim_steps: S (DPPO: 5), with T // S >= 1.
        ft_steps: K <= S, the last steps fine-tuned and recorded (DPPO: ft_denoising_steps = S).
        eta: DDIM's eta (DPPO: 1).
        min_std, clip_x0, logprob_reduction, noise_clip, logprob_clip, logprob_horizon: as for
            :class:`~flowrl.samplers.ddpm_policy.DDPMPolicySampler`.
    """

    name = "ddim"
    mean_path_forgets_noise = False  # DDIM's mean path is a deterministic map of x_T

    def __init__(
        self,
        num_train_steps: int = 100,
        ddim_steps: int = 5,
        ft_steps: int = 5,
        eta: float = 1.0,
        min_std: float = 0.1,
        clip_x0: float | None = 1.0,
        logprob_reduction: str = "mean",
        noise_clip: float | None = 3.0,
        logprob_clip: tuple[float, float] | None = (-5.0, 2.0),
        logprob_horizon: int | None = None,
    ):
        if not 1 <= ddim_steps <= num_train_steps:
            raise ValueError(
                f"sampler.num_steps (DDIM steps) must be in [1, {num_train_steps}], got {ddim_steps}"
            )
        if not 1 <= ft_steps <= ddim_steps:
            raise ValueError(
                f"sampler.ft_steps must be in [1, sampler.num_steps={ddim_steps}], got {ft_steps}"
            )
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        super().__init__(
            num_train_steps,
            1,
            min_std,
            clip_x0,
            logprob_reduction,
            noise_clip=noise_clip,
            logprob_clip=logprob_clip,
            logprob_horizon=logprob_horizon,
        )
        self.eta, self.ddim_steps, self.ft_steps = eta, ddim_steps, ft_steps
        ratio = num_train_steps // ddim_steps
        taus = torch.arange(ddim_steps) * ratio  # (S,) ascending, DPPO's "uniform"
        a = self.alphas_cumprod[taus]
        a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
        # sampling order: step k is DDIM index S - 1 - k
        self.timesteps = taus.flip(0)  # (S,) the network's timestep at each step
        self.num_steps = ddim_steps
        self.model_timesteps = self.timesteps
        self.next_timesteps = torch.cat([self.timesteps[1:], torch.full((1,), -1)])
        self.recorded_from = ddim_steps - ft_steps
        self._ddim = torch.stack([a, a_prev], dim=1).flip(0).float()  # (S, 2) (a, a') per step k

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
        """Step k (B,): DDIM from tau_{S-1-k} to the next timestep; with ``stochastic=False`` std 0."""
        eps, x = model_output.float(), sample.float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        rows = self._ddim[k.cpu()].to(x.device)
        a, a_prev = rows[:, 0].view(shape), rows[:, 1].view(shape)
        # 1. x0_hat, clipped to the action range, and the eps it implies (DPPO re-derives it)
        pred_original = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if self.clip_x0 is not None:
            pred_original = pred_original.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - a.sqrt() * pred_original) / (1 - a).sqrt()
        # 2. DDIM's sigma with eta and its mean (Song et al. eq. 12)
        sigma = (self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).clamp(min=1e-10)
        mean = a_prev.sqrt() * pred_original + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        std = sigma.clamp(min=self.min_std) if stochastic else torch.zeros_like(sigma)
        # 3. draw x' ~ N(mu, std^2 I) unless given, and its log-density (the std floored)
        prev_sample, log_prob = self.draw(mean, std, prev_sample, generator, noise, stochastic)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)


def from_config(sc, adapter, evaluation: bool = False) -> DDIMPolicySampler:
    """A task's DPPO DDIM chain: ``sampler.num_steps`` DDIM steps over the policy's T, the last
    ``sampler.ft_steps`` fine-tuned."""
    return DDIMPolicySampler(
        adapter.num_train_steps,
        sc.num_steps,
        sc.ft_steps,
        sc.eta,
        sc.min_std,
        sc.denoised_clip,
        sc.logprob_reduction,
        noise_clip=sc.noise_clip,
        logprob_clip=sc.logprob_clip,
        logprob_horizon=getattr(sc, "logprob_horizon", None),
    )
