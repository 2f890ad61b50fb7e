"""DDIM with eta > 0 as a Gaussian policy (DDPO, Black et al. 2023, https://arxiv.org/abs/2305.13301).

Notation (Song et al. 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502):

    alpha_prod_t       -> a_t         cumulative product of (1 - beta), at the current step
    alpha_prod_t_prev  -> a_{t-1}     the same at the step the transition lands on
    pred_original      -> x0_hat      the model's estimate of the clean sample
    pred_epsilon       -> eps_hat     the model's estimate of the noise
    std_dev_t          -> sigma_t(eta)

One step, formula (12) with (16):

    sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})
    mu      = sqrt(a_{t-1}) * x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) * eps_hat
    x_{t-1} ~ N(mu, sigma_t^2 I)

so log p(x_{t-1} | x_t, c) is a Gaussian log-density, exact and cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction


class DDIMSampler(ChainSampler):
    """DDIM(eta) over the timestep schedule of a diffusers ``DDIMScheduler`` config.

    Args:
        scheduler_config: the pipeline's scheduler config (``pipe.scheduler.config``); its
            ``num_train_timesteps``, betas, ``steps_offset``, ``set_alpha_to_one``,
            ``timestep_spacing``, ``clip_sample`` and ``prediction_type`` are honoured.
        num_steps: K, the number of denoising steps.
        eta: noise scale; 0 is deterministic DDIM (evaluation), 1 is DDPM-like (DDPO's default).
        logprob_reduction: ``"mean"`` or ``"sum"`` over event dims (see ``reduce_event``).
    """

    name = "ddim"

    def __init__(
        self, scheduler_config: dict, num_steps: int = 50, eta: float = 1.0, logprob_reduction: str = "mean"
    ):
        from diffusers import DDIMScheduler

        if num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {eta}")
        check_reduction(logprob_reduction)
        config = dict(scheduler_config)
        if config.get("thresholding", False):
            raise ValueError(
                "DDIM with dynamic thresholding has no Gaussian step; set thresholding=False in the scheduler config"
            )
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(num_steps)
        self.config = scheduler.config
        self.num_steps = num_steps
        self.eta = eta
        self.logprob_reduction = logprob_reduction
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.double()  # (T,)
        self.final_alpha_cumprod = float(scheduler.final_alpha_cumprod)
        self.timesteps = scheduler.timesteps.clone()  # (K,) descending
        step_ratio = scheduler.config.num_train_timesteps // num_steps
        self.prev_timesteps = self.timesteps - step_ratio  # (K,), as DDIMScheduler.step computes it
        self.model_timesteps, self.next_timesteps = self.timesteps, self.prev_timesteps
        if eta > 0:
            std = self.std(self.timesteps, self.prev_timesteps)
            if (std == 0).any():
                bad = self.timesteps[std == 0].tolist()
                raise ValueError(
                    f"DDIM step std is 0 at timesteps {bad} although eta={eta}: the log-prob there is undefined. "
                    "Use Stable Diffusion's scheduler settings steps_offset=1 and set_alpha_to_one=False."
                )

    # ------------------------------------------------------------------ schedule
    def _alpha_prod(self, t: Tensor) -> Tensor:
        """a_t for integer timesteps t (any shape); a_{-n} is ``final_alpha_cumprod``."""
        t = t.long().cpu()
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, a, torch.full_like(a, self.final_alpha_cumprod)).float()

    def std(self, t: Tensor, prev_t: Tensor) -> Tensor:
        """sigma_t(eta) of formula (16), float32, shape of t."""
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        return self.eta * variance.clamp(min=0).sqrt()

    # ------------------------------------------------------------------ one step
    def step(
        self,
        model_output: Tensor,
        t: Tensor,
        prev_t: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """One DDIM(eta) transition, in float32 whatever the model dtype.

        Args:
            model_output: (B, C, H, W) the network's output (eps, v or x0 per ``prediction_type``).
            t, prev_t: (B,) integer timesteps of this step and the one it lands on.
            sample: (B, C, H, W) x_t.
            prev_sample: (B, C, H, W) x_{t-1} to evaluate; drawn from the step's Gaussian if None.
            generator / noise: the randomness for drawing x_{t-1} (noise ~ N(0, I) given directly
                reproduces ``DDIMScheduler.step(..., variance_noise=noise)``).
        """
        model_output, sample = model_output.float(), sample.float()
        shape = (-1,) + (1,) * (sample.ndim - 1)
        # 1. a_t and a_{t-1}, per sample
        a_t = self._alpha_prod(t).to(sample.device).view(shape)
        a_prev = self._alpha_prod(prev_t).to(sample.device).view(shape)
        b_t = 1 - a_t
        # 2. x0_hat and eps_hat from the model output, formula (12)
        if self.prediction_type == "epsilon":
            pred_original = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
            pred_epsilon = model_output
        elif self.prediction_type == "v_prediction":
            pred_original = a_t.sqrt() * sample - b_t.sqrt() * model_output
            pred_epsilon = a_t.sqrt() * model_output + b_t.sqrt() * sample
        elif self.prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - a_t.sqrt() * pred_original) / b_t.sqrt()
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        # 3. optional clipping of x0_hat (as DDIMScheduler; eps_hat is not re-derived)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_original = pred_original.clamp(-r, r)
        # 4. sigma_t(eta), formula (16)
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = self.eta * variance.clamp(min=0).sqrt()
        # 5. the mean: "x0 part" plus "direction pointing to x_t", formula (12)
        mean = a_prev.sqrt() * pred_original + (1 - a_prev - std**2).clamp(min=0).sqrt() * pred_epsilon
        # 6. draw x_{t-1} ~ N(mean, sigma_t^2 I) unless given
        if prev_sample is None:
            if noise is None:
                noise = randn(sample.shape, generator, sample.device)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        # 7. log N(x_{t-1}; mean, sigma_t^2 I), reduced over event dims
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, self.logprob_reduction)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)

    # ------------------------------------------------------------------ the chain
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
        """Step k (B,) of the schedule; with eta = 0 or ``stochastic=False``, the deterministic mean."""
        t, prev_t = self.timesteps[k], self.prev_timesteps[k]  # CPU: the schedule is indexed there
        if prev_sample is None and (not stochastic or self.eta == 0):
            step = self.step(
                model_output, t, prev_t, sample, noise=torch.zeros_like(sample, dtype=torch.float32)
            )
            step.log_prob = torch.full_like(step.log_prob, float("nan"))
            return step
        return self.step(
            model_output, t, prev_t, sample, prev_sample=prev_sample, generator=generator, noise=noise
        )

    # ------------------------------------------------------------------ the forward process
    def denoising_loss(self, adapter, x0, cond, k, noise, guidance_scale=1.0, target="eps") -> Tensor:
        """(B,) the diffusion loss at x0 noised to the timestep t_k of step k (Ho et al. 2020, eq. 14):

            x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps

        ``target="eps"``: mean (eps - eps_hat)^2 with eps_hat from the network's output (whatever
        it predicts, as step 2 of :meth:`step` converts it); ``"model"``: the squared error against
        the network's own target (eps, v = sqrt(a) eps - sqrt(1 - a) x0, or x0)."""
        x0, noise = x0.float(), noise.float()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = self._alpha_prod(self.timesteps[k.cpu()]).to(x0.device).view(shape)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = self.predict(adapter, x_t, k, cond, guidance_scale).float()
        p = self.prediction_type
        if target == "eps":
            if p == "epsilon":
                eps_hat = out
            elif p == "v_prediction":
                eps_hat = a.sqrt() * out + (1 - a).sqrt() * x_t
            else:
                eps_hat = (x_t - a.sqrt() * out) / (1 - a).sqrt()
            err = noise - eps_hat
        else:
            goal = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}.get(p, x0)
            err = out - goal
        return err.pow(2).mean(dim=tuple(range(1, x0.ndim)))


def from_config(sc, adapter, evaluation: bool = False) -> DDIMSampler:
    """A task's DDIM chain (``evaluation``: eta 0 over ``eval_num_steps``, deterministic)."""
    steps = (sc.eval_num_steps or sc.num_steps) if evaluation else sc.num_steps
    return DDIMSampler(adapter.scheduler_config, steps, 0.0 if evaluation else sc.eta, sc.logprob_reduction)
