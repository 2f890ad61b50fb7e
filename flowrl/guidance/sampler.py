"""A sampler whose ``sample`` runs a guidance method, so reward-guided samples go wherever a
sampler goes: a collector's evaluation rollouts (``flowrl evaluate --guide``), a script's loop."""

from __future__ import annotations

import torch

from flowrl.chain import Chain
from flowrl.guidance.best_of_n import best_of_n
from flowrl.guidance.common import GuidanceResult
from flowrl.guidance.reward_gradient import reward_gradient_guidance
from flowrl.guidance.smc import smc_guidance

METHODS = {"reward-grad": reward_gradient_guidance, "best-of-n": best_of_n, "smc": smc_guidance}


class GuidedSampler:
    """Reward-guided samples from any :class:`~flowrl.samplers.base.ChainSampler`.

    Args:
        sampler: the chain to guide (DDIM, flow, LCM, a policy's DDPM or ReinFlow chain).
        method: ``reward-grad`` (DPS at the predicted clean sample), ``best-of-n`` or ``smc``.
        reward: a guidance reward ``(samples, inputs, metadata) -> (B,)`` (a
            :class:`~flowrl.rewards.Reward`, or an action reward behind
            :class:`~flowrl.guidance.actions.ChunkReward`).
        stochastic: sample every step's noise, or (False) run the mean path. None: True for SMC
            (its resampled copies of a particle stay identical without noise) and for best-of-N
            on a chain whose mean path nearly forgets x_0 (DDPM: the candidates would barely
            differ); False otherwise (a flow policy's few ODE steps map different x_0 to different
            chunks, and noise on them is never denoised).
        options: the method's own, e.g. ``scale``/``schedule`` (reward-grad), ``n`` (best-of-n),
            ``num_particles``/``lam``/``potential`` (smc).
    """

    def __init__(self, sampler, method: str, reward, stochastic: bool | None = None, **options):
        if method not in METHODS:
            raise ValueError(f"guidance method must be one of {tuple(METHODS)}, got {method!r}")
        if stochastic is None:
            stochastic = method == "smc" or (
                method == "best-of-n" and getattr(sampler, "mean_path_forgets_noise", False)
            )
        self.inner, self.method, self.reward = sampler, method, reward
        self.stochastic, self.options = stochastic, options

    def guide(
        self, adapter, inputs, generator: torch.Generator | None = None, guidance_scale: float = 1.0
    ) -> GuidanceResult:
        """Guided samples for the adapter's ``inputs`` (prompts, or observation histories)."""
        run = METHODS[self.method]
        return run(
            self.inner,
            adapter,
            self.reward,
            inputs,
            guidance_scale=guidance_scale,
            generator=generator,
            deterministic=not self.stochastic,
            **self.options,
        )

    @torch.no_grad()
    def sample(
        self, adapter, inputs, guidance_scale: float = 1.0, generator: torch.Generator | None = None, **_
    ) -> Chain:
        """A sampler's ``sample``: a Chain holding only the guided final samples, ``latents``
        (B, 1, *event). The guide's ``stochastic`` decides the noise (a ``deterministic`` request
        of the caller is ignored)."""
        x = self.guide(adapter, inputs, generator, guidance_scale).latents
        empty = torch.zeros(x.shape[0], 0, device=x.device)
        return Chain(x[:, None], empty, empty, empty, {}, guidance_scale=guidance_scale)
