"""Multistep latent-consistency sampling as a Gaussian policy (RLCM, Oertell et al. 2024,
https://arxiv.org/abs/2404.03673; LCM, Luo et al. 2023, https://arxiv.org/abs/2310.04378).

Notation (as diffusers' ``LCMScheduler.step``):
    t_0 > ... > t_{K-1}             the K timesteps (``schedule``, below)
    a_t                             cumulative alpha at timestep t
    c_skip, c_out                   consistency boundary scalings at t (sigma_data = 0.5)

Step k, at t = t_k, lands at t' = t_{k+1}; the last step (k = K-1) has no t_K:
    tau      = t * timestep_scaling,  c_skip = 0.25 / (tau^2 + 0.25),  c_out = tau / sqrt(tau^2 + 0.25)
    x0_hat   = (x_t - sqrt(1 - a_t) out) / sqrt(a_t)    [epsilon]  (v / sample prediction as diffusers;
               clamped to +-clip_sample_range when clip_sample)
    f(x_t)   = c_out * x0_hat + c_skip * x_t             the consistency function (pred_original_sample)
    k < K-1: x_{t'} ~ N(sqrt(a_{t'}) f(x_t), (1 - a_{t'}) I)          re-noising: the policy step
    k = K-1, ``last_step="renoise"`` (default, as RLCM's scheduler and training loop):
             x_K ~ N(sqrt(a_t) f(x_t), (1 - a_t) I), re-noised to the level of t_{K-1} itself (the
             scheduler's "previous timestep" after the last is the current one, so
             ``final_alpha_cumprod`` is never used); its log-prob is recorded and trained, but the
             chain's final state ``latents[:, -1]`` is f(x_t), the latent RLCM's pipeline decodes.
             x_K itself is kept in the chain's ``cond[RENOISED]`` so the step can be re-evaluated.
    k = K-1, ``last_step="deterministic"`` (flowrl's earlier chain): the step outputs f(x_t), std 0,
             log-prob NaN, not trained. Prefer it when the last step should not be trained: the
             image never depends on x_K, so that term adds only zero-mean noise to the gradient.
log p = the elementwise Gaussian log-density (no clamp), reduced over the event dims by
``logprob_reduction`` (RLCM: the mean). The step math runs in float32 whatever the model's dtype.

``schedule="rlcm"`` (default) takes RLCM's timesteps: of the N = ``original_inference_steps``
distillation timesteps c - 1, 2c - 1, ..., N c - 1 (c = T // N), every (N // K)-th from the last,
the first K (RLCM's patched ``set_timesteps``; RLCM pins diffusers 0.23.1). ``schedule="diffusers"``
takes the installed diffusers' ``set_timesteps(K)`` (recent versions space the indices by
``floor(linspace)``: K = 4 gives 999, 759, 499, 259 where RLCM has 999, 759, 519, 279; K = 2 agrees).
``transition`` ignores ``stochastic``: an LCM chain always re-noises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction

LAST_STEPS = ("renoise", "deterministic")
SCHEDULES = ("rlcm", "diffusers")
# the chain's condition entry that keeps the last step's re-noised sample x_K, (B, *event)
RENOISED = "lcm_renoised"


def rlcm_timesteps(num_train_timesteps: int, original_steps: int, num_steps: int) -> Tensor:
    """(K,) RLCM's LCM schedule: every (original_steps // K)-th distillation timestep, from T - 1 down."""
    if not 1 <= num_steps <= original_steps <= num_train_timesteps:
        raise ValueError(
            f"sampler.num_steps={num_steps} must be in [1, original_inference_steps={original_steps}] "
            f"(and that at most num_train_timesteps={num_train_timesteps})"
        )
    c = num_train_timesteps // original_steps
    origin = torch.arange(1, original_steps + 1) * c - 1  # the distillation timesteps, ascending
    return origin.flip(0)[:: original_steps // num_steps][:num_steps].long()


class LCMSampler(ChainSampler):
    """LCM multistep sampling over an ``LCMScheduler`` config (see the module docstring).

    Args:
        scheduler_config: the pipeline's ``LCMScheduler`` config.
        num_steps: K (LCM: 2-8; RLCM trains on 8).
        logprob_reduction: ``"mean"`` (RLCM) or ``"sum"``.
        last_step: ``"renoise"`` (RLCM: the last step re-noises and is trained) or
            ``"deterministic"`` (f(x_t), log-prob NaN, not trained).
        schedule: ``"rlcm"`` (RLCM's timesteps) or ``"diffusers"`` (the installed diffusers').
    """

    name = "lcm"

    def __init__(
        self,
        scheduler_config: dict,
        num_steps: int = 4,
        logprob_reduction: str = "mean",
        last_step: str = "renoise",
        schedule: str = "rlcm",
    ):
        from diffusers import LCMScheduler

        if last_step not in LAST_STEPS:
            raise ValueError(f"sampler.lcm_last_step must be one of {LAST_STEPS}, got {last_step!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"sampler.lcm_schedule must be one of {SCHEDULES}, got {schedule!r}")
        if num_steps < 2:
            raise ValueError(
                f"sampler.num_steps must be >= 2 for LCM, got {num_steps}: with one step the image is f(x_T) "
                "and depends on no sampled noise"
            )
        check_reduction(logprob_reduction)
        scheduler = LCMScheduler.from_config(dict(scheduler_config))
        if scheduler.config.thresholding:
            raise ValueError("LCM with dynamic thresholding has no Gaussian step; set thresholding=False")
        if schedule == "rlcm":
            c = scheduler.config
            timesteps = rlcm_timesteps(c.num_train_timesteps, c.original_inference_steps, num_steps)
            scheduler.set_timesteps(timesteps=timesteps.tolist())  # so self.scheduler steps the same chain
        else:
            scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.config = scheduler.config
        self.num_steps = num_steps
        self.logprob_reduction = logprob_reduction
        self.last_step = last_step
        self.schedule = schedule
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.timesteps = scheduler.timesteps.clone().long()  # (K,)
        # the step after the last is marked -1: it re-noises to t_{K-1}'s level, or stops at f(x_t)
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
        """One consistency step, as the scheduler's ``step``; ``next_t`` (B,) = -1 marks the last step.

        ``prev_sample`` is the Gaussian's sample: on the last step with ``last_step="renoise"`` the
        re-noised x_K (returned as ``prev_sample``; the chain's state is ``pred_original_sample``,
        see :meth:`transition`)."""
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
        # 4. re-noise to t' (the Gaussian policy); the last step re-noises to t's own level, or stops
        final = (next_t < 0).to(x.device).view(shape)
        a_next = torch.where(final, a_t, self._alpha(next_t).to(x.device).view(shape))
        if self.last_step == "renoise":
            mean, std = a_next.sqrt() * denoised, (1 - a_next).sqrt()
        else:
            mean = torch.where(final, denoised, a_next.sqrt() * denoised)
            std = torch.where(final, torch.zeros_like(a_next), (1 - a_next).sqrt())
        if prev_sample is None:
            if noise is None:
                noise = randn(x.shape, generator, x.device)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, safe_std, self.logprob_reduction)
        log_prob = torch.where(std.flatten() > 0, log_prob, torch.full_like(log_prob, float("nan")))
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
        """Step k (B,) of the consistency chain (always re-noising; ``stochastic`` is ignored).

        With ``last_step="renoise"`` a last step lands the chain on f(x_t) (``prev_sample``), while
        its log-prob is that of the re-noised x_K: sampling stores x_K in ``cond[RENOISED]``, and
        re-evaluating (``prev_sample`` given) reads it from there."""
        t, next_t = self.timesteps[k], self.next_timesteps[k]
        final = next_t < 0
        if self.last_step != "renoise" or not bool(final.any()):
            return self.step(model_output, t, next_t, sample, prev_sample, generator, noise)
        view = final.to(sample.device).view((-1,) + (1,) * (sample.ndim - 1))
        if prev_sample is not None:
            if cond is None or RENOISED not in cond:
                raise ValueError(
                    f"re-evaluating LCM's last step needs its re-noised sample in cond[{RENOISED!r}], which "
                    "LCMSampler.sample records; this chain has none"
                )
            prev_sample = torch.where(view, cond[RENOISED], prev_sample)
        step = self.step(model_output, t, next_t, sample, prev_sample, generator, noise)
        if cond is not None and prev_sample is None:
            cond[RENOISED] = step.prev_sample.detach()
        chain_next = torch.where(view, step.pred_original_sample, step.prev_sample)
        return StepOutput(chain_next, step.mean, step.std, step.log_prob, step.pred_original_sample)

    def sample(self, adapter, inputs, guidance_scale=1.0, generator=None, latents=None, cond=None, **kwargs):
        """:meth:`ChainSampler.sample` on a copy of the condition, to which the last step adds x_K."""
        cond = adapter.condition(inputs, guidance_scale) if cond is None else cond
        cond = {n: v for n, v in cond.items() if n != RENOISED}
        return super().sample(
            adapter, inputs, guidance_scale, generator=generator, latents=latents, cond=cond, **kwargs
        )


def from_config(sc, adapter, evaluation: bool = False) -> LCMSampler:
    """A task's LCM chain (its evaluation stays seeded-stochastic, over ``eval_num_steps``; the
    image is f(x_t) of the last step either way)."""
    steps = (sc.eval_num_steps or sc.num_steps) if evaluation else sc.num_steps
    return LCMSampler(
        adapter.scheduler_config,
        steps,
        sc.logprob_reduction,
        last_step=sc.lcm_last_step,
        schedule=sc.lcm_schedule,
    )
