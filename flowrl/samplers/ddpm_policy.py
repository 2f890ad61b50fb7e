"""DDPM with a minimum std as a Gaussian policy over action chunks (DPPO, Ren et al. 2024,
https://arxiv.org/abs/2409.00588).

Shapes:  B  environments (one action chunk each)   Ta  action horizon   Da  action dim
         To  observation history                   Do  observation dim  K   fine-tuned steps

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239):

    betas[t]             -> beta_t
    alphas_cumprod[t]    -> a_t = prod_{s <= t} (1 - beta_s)      (a_{-1} = 1)
    pred_original        -> x0_hat, clipped to [-clip_x0, clip_x0] (actions are normalized to [-1, 1])
    posterior_variance   -> beta_tilde_t = (1 - a_{t-1}) / (1 - a_t) * beta_t          eq. (7)
    min_std              -> sigma_min, DPPO's floor on the step std ("min_sampling_denoising_std")

One step from x_t to x_{t-1}, eq. (7) and (15), with DPPO's std floor:

    x0_hat  = (x_t - sqrt(1 - a_t) * eps_hat) / sqrt(a_t)
    mu      = sqrt(a_{t-1}) beta_t / (1 - a_t) * x0_hat + sqrt(1 - beta_t) (1 - a_{t-1}) / (1 - a_t) * x_t
    sigma_t = max(sqrt(beta_tilde_t), sigma_min)
    x_{t-1} ~ N(mu, sigma_t^2 I)

The floor makes every step, the last one included (beta_tilde_0 = 0), a Gaussian with a usable
log-density and keeps exploring. As DPPO's code: the drawn noise is clipped to |z| <= noise_clip
(``randn_clip_value`` 3), each element's log-density is clamped to [-5, 2] before the mean over
the chunk (``logprob_clip``; null: the exact density), and evaluation runs DDPM with the
posterior std floored at 1e-3 and a noiseless last step (``eval_noise: posterior``; ``mean``: the
mean path, deterministic). Only the last K steps (t = K-1, ..., 0) are fine-tuned: they run
the trained network and are recorded in the Chain; the first T - K steps run the frozen
pre-trained network (``adapter.reference_forward``) and are part of the environment
(``recorded_from = T - K``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction


def cosine_beta_schedule(num_steps: int, s: float = 0.008) -> Tensor:
    """Betas (T,) of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), clipped to 0.999; DPPO's default."""
    x = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    f = torch.cos((x / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


class DDPMPolicySampler(ChainSampler):
    """DDPM over T denoising steps with a std floor, the last ``ft_steps`` of them an MDP.

    Args:
        num_train_steps: T, the diffusion steps the policy was pre-trained with (DPPO: 20).
        ft_steps: K, the last steps that are fine-tuned and recorded (DPPO: 10).
        min_std: sigma_min, the floor on every step's std while sampling (DPPO: 0.1).
        clip_x0: clip x0_hat to [-clip_x0, clip_x0] (DPPO: 1.0, the normalized action range); null: no clip.
        logprob_reduction: ``"mean"`` or ``"sum"`` over the (Ta, Da) chunk (see ``reduce_event``).
        noise_clip: clip the drawn N(0, I) noise to [-noise_clip, noise_clip] (DPPO: 3); null: no clip.
        logprob_clip: (lo, hi) clamp of each element's log-density before the reduction (DPPO:
            (-5, 2)); null: the exact density.
        eval_noise: the evaluation chain (``stochastic=False``): ``"posterior"`` (DPPO: the
            posterior std floored at 1e-3, the last step noiseless) or ``"mean"`` (the mean path).
        logprob_horizon: h, the log-prob covers the chunk's first h actions only (DPPO's
            ``reward_horizon``: the executed ones); null: the whole chunk.
    """

    name = "ddpm"
    prediction_type = "epsilon"
    # the mean path of a DDPM chain nearly forgets x_T: candidates that differ only in their
    # initial noise barely differ (best-of-N guidance samples every step instead)
    mean_path_forgets_noise = True

    def __init__(
        self,
        num_train_steps: int = 20,
        ft_steps: int = 10,
        min_std: float = 0.1,
        clip_x0: float | None = 1.0,
        logprob_reduction: str = "mean",
        noise_clip: float | None = 3.0,
        logprob_clip: tuple[float, float] | None = (-5.0, 2.0),
        eval_noise: str = "posterior",
        logprob_horizon: int | None = None,
    ):
        if logprob_horizon is not None and logprob_horizon < 1:
            raise ValueError(f"sampler.logprob_horizon must be >= 1 or null, got {logprob_horizon}")
        self.logprob_horizon = logprob_horizon
        if num_train_steps < 1:
            raise ValueError(f"model.num_train_steps must be >= 1, got {num_train_steps}")
        if not 1 <= ft_steps <= num_train_steps:
            raise ValueError(f"sampler.ft_steps must be in [1, {num_train_steps}], got {ft_steps}")
        if min_std <= 0:
            raise ValueError(f"sampler.min_std must be > 0 (it is the std of the last step), got {min_std}")
        check_reduction(logprob_reduction)
        if noise_clip is not None and noise_clip <= 0:
            raise ValueError(f"sampler.noise_clip must be > 0 or null, got {noise_clip}")
        if logprob_clip is not None and (len(logprob_clip) != 2 or not logprob_clip[0] < logprob_clip[1]):
            raise ValueError(
                f"sampler.logprob_clip must be [lo, hi] with lo < hi, or null; got {logprob_clip}"
            )
        if eval_noise not in ("posterior", "mean"):
            raise ValueError(f"sampler.eval_noise must be 'posterior' or 'mean', got {eval_noise!r}")
        self.noise_clip = noise_clip
        self.logprob_clip = None if logprob_clip is None else tuple(float(v) for v in logprob_clip)
        self.eval_noise = eval_noise
        self.num_train_steps = num_train_steps
        self.ft_steps = ft_steps
        self.min_std = min_std
        self.clip_x0 = clip_x0
        self.logprob_reduction = logprob_reduction
        self.betas = cosine_beta_schedule(num_train_steps)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,)
        self.timesteps = torch.arange(num_train_steps - 1, -1, -1)  # (T,) sampling order
        self.num_steps = num_train_steps
        self.model_timesteps, self.next_timesteps = self.timesteps, self.timesteps - 1
        self.recorded_from = num_train_steps - ft_steps
        # (beta_t, a_t, a_{t-1}) as one float32 (T, 3) table, copied once per device: indexing it
        # there with the step's own timesteps costs no host sync
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self._table = torch.stack([self.betas, self.alphas_cumprod, a_prev], dim=1).float()  # (T, 3)
        self._tables: dict[torch.device, Tensor] = {}

    def _gather(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(beta_t, a_t, a_{t-1}) for (B,) timesteps, float32 on ``like``'s device, each shaped
        (B, 1, ..., 1) to broadcast over the event."""
        if like.device not in self._tables:
            self._tables[like.device] = self._table.to(like.device)
        rows = self._tables[like.device][t.long().to(like.device)]  # (B, 3)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return tuple(rows[:, i].view(shape) for i in range(3))

    # ------------------------------------------------------------------ one step
    def step(
        self,
        model_output: Tensor,
        t: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        deterministic: bool = False,
    ) -> StepOutput:
        """One transition x_t -> x_{t-1}, float32.

        Args:
            model_output: (B, Ta, Da) eps_hat, the network's noise prediction.
            t: (B,) integer timesteps in [0, T).
            sample: (B, Ta, Da) x_t.
            prev_sample: (B, Ta, Da) x_{t-1} to evaluate; drawn if None.
            generator / noise: randomness for drawing x_{t-1} (noise ~ N(0, I) given directly).
            deterministic: the evaluation step (``eval_noise``): the posterior std floored at 1e-3
                and 0 at t = 0 (DPPO), or std 0 (the mean path); the log-prob is then NaN. The
                step's noise is drawn all the same, so a seeded run's later draws do not depend
                on which steps were deterministic.
        """
        eps, sample = model_output.float(), sample.float()
        # 1. beta_t, a_t and a_{t-1} (a_{-1} = 1), per sample
        beta_t, a_t, a_prev = self._gather(t, sample)
        # 2. x0_hat from eps_hat, eq. (15), clipped to the normalized action range
        pred_original = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_x0 is not None:
            pred_original = pred_original.clamp(-self.clip_x0, self.clip_x0)
        # 3. the posterior mean mu_tilde(x_t, x0_hat), eq. (7)
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * pred_original + (
            (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)
        ) * sample
        # 4. sigma_t = max(sqrt(beta_tilde_t), sigma_min), beta_tilde from eq. (7)
        posterior_var = (1 - a_prev) / (1 - a_t) * beta_t
        if not deterministic:
            std = posterior_var.sqrt().clamp(min=self.min_std)
        elif self.eval_noise == "posterior":
            last = t.to(sample.device).view(beta_t.shape) == 0
            std = torch.where(last, 0.0, posterior_var.sqrt().clamp(min=1e-3))
        else:
            std = torch.zeros_like(posterior_var)
        # 5. draw x_{t-1} ~ N(mu, sigma_t^2 I) unless given, and its log-density over the chunk
        prev_sample, log_prob = self.draw(mean, std, prev_sample, generator, noise, not deterministic)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)

    def draw(self, mean, std, prev_sample=None, generator=None, noise=None, stochastic=True):
        """x' ~ N(mean, std^2 I) with the noise clipped to ``noise_clip`` (unless ``prev_sample``
        is given; the noise is drawn on the mean path too), and log N(x'; mean, std^2 I) with the
        elementwise clamp ``logprob_clip``, over the chunk's first ``logprob_horizon`` actions
        (DPPO's reward_horizon); NaN when not ``stochastic``."""
        if prev_sample is None:
            if noise is None:
                noise = randn(mean.shape, generator, mean.device)
            if self.noise_clip is not None:
                noise = noise.clamp(-self.noise_clip, self.noise_clip)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        if not stochastic:
            return prev_sample, torch.full(mean.shape[:1], float("nan"), device=mean.device)
        h = self.logprob_horizon
        log_prob = gaussian_log_prob(
            prev_sample[:, :h].detach(),
            mean[:, :h],
            std.expand_as(mean)[:, :h],
            self.logprob_reduction,
            clamp=self.logprob_clip,
        )
        return prev_sample, log_prob

    # ------------------------------------------------------------------ the chain
    def predict(self, adapter, x, k, cond, guidance_scale=1.0, reference=False, stochastic=True):
        """eps at step k: the fine-tuned network on the last K steps; on the first T - K the frozen
        pre-trained one (when the policy keeps a frozen copy; else its own network, so a reward's
        gradient flows through every step of a BC policy)."""
        t = self.timesteps[k.cpu()].to(x.device, non_blocking=True)
        frozen = k.cpu() < self.recorded_from
        if bool(frozen.any()):
            if not bool(frozen.all()):
                raise ValueError("a DDPM prediction mixes fine-tuned and frozen steps in one batch")
            reference = reference or adapter.has_reference
        if reference:
            return adapter.reference_forward(x, t, cond)
        return adapter(x, t, cond)

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
        """Step k (B,): the DDPM step at t = T - 1 - k; with ``stochastic=False`` its mean."""
        t = self.timesteps[k.cpu()]
        return self.step(model_output, t, sample, prev_sample, generator, noise, deterministic=not stochastic)

    # ------------------------------------------------------------------ the forward process
    def denoising_loss(self, adapter, x0, cond, k, noise, guidance_scale=1.0, target="eps") -> Tensor:
        """(B,) the DDPM loss of the chunk x0 at the timestep t = T - 1 - k of step k (eq. 14):
        mean (eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, s))^2 (the network predicts
        eps, so both targets are this one). Always the fine-tuned network."""
        x0, noise = x0.float(), noise.float()
        t = self.timesteps[k.cpu()].to(x0.device)
        _, a_t, _ = self._gather(t, x0)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        err = noise - adapter(x_t, t, cond).float()
        return err.pow(2).mean(dim=tuple(range(1, x0.ndim)))


def from_config(sc, adapter, evaluation: bool = False) -> DDPMPolicySampler:
    """A task's DPPO chain over the policy's T pre-training steps (evaluation: the same chain with
    ``sampler.eval_noise``: DPPO's posterior noise, or the mean path)."""
    return DDPMPolicySampler(
        adapter.num_train_steps,
        sc.ft_steps,
        sc.min_std,
        sc.denoised_clip,
        sc.logprob_reduction,
        noise_clip=sc.noise_clip,
        logprob_clip=sc.logprob_clip,
        eval_noise=sc.eval_noise,
        logprob_horizon=sc.logprob_horizon,
    )
