"""The chain of a Gaussian head: one Gaussian step (the MDP's action) and at most one frozen,
deterministic step that runs a pre-trained diffusion or flow policy as a black box.

Shapes:  B  environments (one action chunk each)   Ta  action horizon   Da  action dim
         To  observation history                   Do  observation dim  K   1 or 2 chain steps

The adapter (:mod:`flowrl.models.gaussian_policy`) says the order of the steps (``layout``):
(gaussian,) for the Gaussian MLP policy, (frozen, gaussian) for a residual policy, (gaussian,
frozen) for DSRL. Notation of the Gaussian step from state x_k (the adapter's ``gaussian``):

    mu, sigma      -> the head's mean and std at (s, x_k)
    shift, scale   -> the affine map from the head's variable z to the chain's state (None: x = z;
                      a residual policy: x_k and ResiP's action scale alpha)

    z       = mu + sigma * clip(eps, -c, c),  eps ~ N(0, I)       c = noise_clip (DPPO's randn_clip_value 3)
    x_{k+1} = shift + scale * z
    log pi  = clamp(reduce(log N(z; mu, sigma^2 I)), lo, hi)      with z = (x_{k+1} - shift) / scale

The log-prob is of z (ResiP's residual, DSRL's noise action u, the Gaussian policy's action) and
is computed from the recorded x_{k+1} both when sampling and when re-evaluating, so the on-policy
ratio is exactly 1. ``logprob_clip`` clamps the *reduced* log-prob as DPPO's ``PPO_Gaussian.loss``
does (its [-5, 2] on the per-dimension mean); null: the exact density. The mean path
(``deterministic``) takes z = mu (DPPO evaluates with sigma 1e-4).

The frozen step maps x_k to the base policy's action chunk with its deterministic chain from the
initial noise x_T = ``adapter.base_noise(x_k)`` (a residual policy: the chain's own x_0 ~ N(0, I),
or 0; DSRL: w = b tanh(u)):

    flow policy       K_b Euler steps of dx/dt = v(x, t, s), each clipped to [-c_d, c_d] (ReinFlow's
                      deterministic path, c_d = denoised_clip)
    diffusion policy  K_b DDIM steps with eta = 0 on the leading timesteps t_i = i * (T // K_b)
                      (Song et al. 2021, eq. 12; DPPO's ``use_ddim``, DSRL's ddim_steps 5):
                        x0_hat = clip((x_t - sqrt(1 - a_t) eps) / sqrt(a_t), -c_d, c_d)
                        eps    = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)      (DPPO recomputes it)
                        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps,   a_prev = 1 after t = 0
                      and the final chunk clipped to [-c_d, c_d]

with K_b = ``sampler.num_steps``. The frozen step has no log-prob (NaN); it is not trained.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn
from flowrl.errors import ConfigError
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction

HEAD_FAMILIES = ("gaussian_policy", "residual_policy", "dsrl_policy")


@torch.no_grad()
def frozen_chain(base, x_T: Tensor, cond: dict[str, Tensor], num_steps: int, clip: float | None) -> Tensor:
    """(B, Ta, Da) the base policy's deterministic chunk from the initial noise x_T (module docstring)."""
    x = x_T.float()
    B = x.shape[0]
    if base.family == "flow_policy":
        dt = 1.0 / num_steps
        for k in range(num_steps):
            t = torch.full((B,), k * dt, device=x.device)
            x = x + dt * base(x, t, cond).float()
            if clip is not None:
                x = x.clamp(-clip, clip)
        return x
    T = base.num_train_steps
    a = base.alphas_cumprod.float()
    ts = [i * (T // num_steps) for i in range(num_steps)]
    for i in reversed(range(num_steps)):
        a_t = a[ts[i]]
        a_prev = a[ts[i - 1]] if i > 0 else torch.ones((), device=x.device)
        eps = base(x, torch.full((B,), ts[i], dtype=torch.long, device=x.device), cond).float()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-clip, clip) if clip is not None else x


class GaussianChainSampler(ChainSampler):
    """The head's chain (see the module docstring).

    Args:
        layout: the steps in order, each ``"gaussian"`` or ``"frozen"``.
        logprob_reduction: ``"mean"`` (DPPO's Gaussian) or ``"sum"`` (ResiP, DSRL) over the chunk.
        noise_clip: clip of the drawn N(0, I) noise (DPPO: 3); null: none (ResiP, DSRL).
        logprob_clip: (lo, hi) clamp of the reduced log-prob (DPPO: (-5, 2)); null: exact.
        base_steps: K_b, the frozen chain's steps; base_clip: its c_d.
    """

    name = "gaussian"
    prediction_type = "gaussian"

    def __init__(
        self,
        layout: tuple[str, ...],
        logprob_reduction: str = "mean",
        noise_clip: float | None = 3.0,
        logprob_clip: tuple[float, float] | None = (-5.0, 2.0),
        base_steps: int = 4,
        base_clip: float | None = 1.0,
    ):
        check_reduction(logprob_reduction)
        if not layout or any(s not in ("gaussian", "frozen") for s in layout):
            raise ValueError(f"a Gaussian chain's layout is gaussian / frozen steps, got {layout}")
        self.layout = tuple(layout)
        self.num_steps = len(layout)
        self.logprob_reduction = logprob_reduction
        self.noise_clip, self.logprob_clip = noise_clip, logprob_clip
        self.base_steps, self.base_clip = base_steps, base_clip
        self.model_timesteps = torch.arange(self.num_steps, dtype=torch.float32)  # (K,) step indices
        self.next_timesteps = self.model_timesteps + 1

    def _kind(self, k: Tensor) -> str:
        kinds = {self.layout[i] for i in set(k.tolist())}  # (torch.unique costs ~0.3 ms per call on a CPU)
        if len(kinds) != 1:
            raise ValueError("a Gaussian chain's prediction mixes its Gaussian and frozen steps in one batch")
        return kinds.pop()

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        return {k for k, s in enumerate(self.layout) if s == "gaussian"}

    def predict(self, adapter, x, k, cond, guidance_scale=1.0, reference=False, stochastic=True):
        """The Gaussian step's (mu, sigma, shift, scale), or the frozen step's next state (its chain run)."""
        if self._kind(k) == "frozen":
            base = getattr(adapter, "base", adapter)  # a bare diffusion / flow policy is its own base
            noise = adapter.base_noise(x) if hasattr(adapter, "base_noise") else x
            return frozen_chain(base, noise, cond, self.base_steps, self.base_clip)
        return adapter.gaussian(x, cond, reference=reference)

    def step(
        self,
        mu: Tensor,
        std: Tensor,
        shift: Tensor | None,
        scale: float | None,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        deterministic: bool = False,
    ) -> StepOutput:
        """The Gaussian step; ``prev_sample`` (B, Ta, Da) the recorded x_{k+1} to evaluate, drawn if None."""
        mu, std = mu.float(), std.float()
        # 1. z ~ N(mu, sigma^2 I) with the drawn noise clipped (the mean path: z = mu)
        if prev_sample is None:
            if deterministic:
                z = mu
            else:
                if noise is None:
                    noise = randn(mu.shape, generator, mu.device)
                if self.noise_clip is not None:
                    noise = noise.clamp(-self.noise_clip, self.noise_clip)
                z = mu + std * noise
            # 2. x_{k+1} = shift + scale * z
            prev_sample = z if shift is None else shift.float() + scale * z
        prev_sample = prev_sample.float()
        # 3. log N(z; mu, sigma^2 I) of z recovered from the recorded state, reduced, clamped
        if deterministic:
            log_prob = torch.full(mu.shape[:1], float("nan"), device=mu.device)
        else:
            z = prev_sample.detach() if shift is None else (prev_sample.detach() - shift.float()) / scale
            log_prob = gaussian_log_prob(z, mu, std, self.logprob_reduction)
            if self.logprob_clip is not None:
                log_prob = log_prob.clamp(*self.logprob_clip)
        return StepOutput(prev_sample, mu, std, log_prob, prev_sample)

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
        """Step k (B,): the Gaussian step (its mean with ``stochastic=False``), or the frozen chain's result."""
        if self._kind(k) == "frozen":
            x = model_output.float() if prev_sample is None else prev_sample.float()
            nan = torch.full(x.shape[:1], float("nan"), device=x.device)
            return StepOutput(x, x, torch.zeros_like(x), nan, x)
        mu, std, shift, scale = model_output
        return self.step(mu, std, shift, scale, prev_sample, generator, noise, deterministic=not stochastic)


def validate(cfg) -> None:
    """The head families' options (config time)."""
    m, s, a = cfg.model, cfg.sampler, cfg.algorithm
    if m.family not in HEAD_FAMILIES:
        raise ConfigError(
            f"sampler.name=gaussian runs a Gaussian head; set model.family to one of {list(HEAD_FAMILIES)}"
        )
    if not 0 < m.gaussian_std_min <= m.gaussian_std_init <= m.gaussian_std_max:
        raise ConfigError(
            "model.gaussian_std_min <= gaussian_std_init <= gaussian_std_max must hold with min > 0, got "
            f"{m.gaussian_std_min}, {m.gaussian_std_init}, {m.gaussian_std_max}; DPPO's are 0.01, 0.1, 0.2"
        )
    clip = s.logprob_clip
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        raise ConfigError(f"sampler.logprob_clip must be [lo, hi] with lo < hi, or null; got {clip}")
    if m.family == "gaussian_policy":
        return
    if m.base_family not in ("diffusion_policy", "flow_policy"):
        raise ConfigError(
            f"model.base_family must be diffusion_policy or flow_policy (the frozen policy a {m.family} steers), "
            f"got {m.base_family!r}"
        )
    if m.base_family == "diffusion_policy" and s.num_steps > m.num_train_steps:
        raise ConfigError(
            f"sampler.num_steps={s.num_steps}: the frozen DDIM chain takes at most model.num_train_steps="
            f"{m.num_train_steps} steps; DSRL's is 5"
        )
    if m.residual_scale <= 0 or m.dsrl_noise_bound <= 0:
        raise ConfigError(
            f"model.residual_scale and model.dsrl_noise_bound must be > 0, got {m.residual_scale} and "
            f"{m.dsrl_noise_bound}; ResiP's action_scale is 0.1, DSRL's action_magnitude 1.5"
        )
    if m.base_noise not in ("sampled", "zero"):
        raise ConfigError(f"model.base_noise must be sampled or zero, got {m.base_noise!r}")
    if a.bc_coef > 0:
        raise ConfigError(
            f"algorithm.bc_coef: a {m.family} trains a head on a frozen policy, which has no BC loss of its own; "
            "set algorithm.bc_coef=0"
        )


def from_config(sc, adapter, evaluation: bool = False) -> GaussianChainSampler:
    """The head's chain; for a bare diffusion / flow policy (a residual or DSRL task's BC policy,
    evaluated by ``flowrl pretrain``) the one frozen step: the chain the head will steer."""
    layout = getattr(adapter, "layout", ("frozen",))
    clip = None if sc.logprob_clip is None else tuple(sc.logprob_clip)
    return GaussianChainSampler(
        layout, sc.logprob_reduction, sc.noise_clip, clip, base_steps=sc.num_steps, base_clip=sc.denoised_clip
    )
