"""Reward-gradient guidance (DPS-style; Chung et al. 2023, https://arxiv.org/abs/2209.14687;
universal guidance, Bansal et al. 2023) for a differentiable reward r.

At each step k, with x0_hat(x_t) the sampler's predicted clean sample:

    x_{t-1} = step_k(x_t) + rho_k * grad_{x_t} r(decode(x0_hat(x_t)))

The gradient flows through the network (``through_model=True``, DPS) or only through the
decoder at x0_hat (``False``: cheaper, a first-order approximation). The step size follows a
schedule rho_k = scale * s(k / (K - 1)): ``constant`` s = 1, ``linear`` s = k / (K - 1)
(stronger as the sample forms), ``cosine`` s = sin(pi k / (K - 1) / 2)^2. With ``normalize`` (the
default) the gradient is divided by its per-sample RMS, so ``scale`` is the per-step shift in
units of the sample's own scale, whatever the reward's units (a mean over pixels has tiny
gradients; a sum has huge ones).
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map

from flowrl.core.seeding import randn
from flowrl.guidance.common import GuidanceResult, score

SCHEDULES = {
    "constant": lambda u: 1.0,
    "linear": lambda u: u,
    "cosine": lambda u: math.sin(math.pi * u / 2) ** 2,
}


def reward_gradient_guidance(
    sampler,
    adapter,
    reward,
    prompts: list[str],
    scale: float = 0.1,
    schedule: str = "constant",
    through_model: bool = True,
    normalize: bool = True,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    deterministic: bool = False,
) -> GuidanceResult:
    """Guided sampling; ``reward`` must be differentiable in the samples (a Reward whose
    ``differentiable`` is True, or a plain function of them). ``prompts`` are the adapter's inputs
    (prompts, or observation histories for a policy); ``deterministic`` runs every step's mean."""
    if getattr(reward, "differentiable", True) is False:
        raise ValueError(
            "reward-gradient guidance needs a differentiable reward; use best_of_n or smc for this one"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    device, B, K = adapter.device, len(prompts), sampler.num_steps
    cond = adapter.condition(prompts, guidance_scale)
    x = randn((B, *adapter.latent_shape), generator, device) if latents is None else latents
    stochastic = set() if deterministic else sampler.stochastic_steps(generator)
    for k in range(K):
        rho = scale * SCHEDULES[schedule](k / max(K - 1, 1))
        kb = torch.full((B,), k, dtype=torch.long)
        noisy = k in stochastic
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = sampler.predict(adapter, x_in, kb, cond, guidance_scale, stochastic=noisy)
            if not through_model:
                out = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)
            step = sampler.transition(kb, out, x_in, cond, generator=generator, stochastic=noisy)
            x0 = step.pred_original_sample
            if not through_model:
                x0 = x0.detach().requires_grad_(True)
            r = score(reward, adapter.decode_latents(x0), prompts)
            grad = torch.autograd.grad(r.sum(), x_in if through_model else x0)[0]
            if normalize:
                rms = grad.pow(2).mean(dim=tuple(range(1, grad.ndim)), keepdim=True).sqrt()
                grad = grad / (rms + 1e-12)
        x = (step.prev_sample + rho * grad).detach()
    images = adapter.decode(x)
    cfg_factor = 2 if guidance_scale > 1 and getattr(adapter, "uses_cfg", True) else 1
    per_step = (3 if through_model else 1) * cfg_factor  # forward + backward (~2 forwards) through the net
    return GuidanceResult(
        x,
        images,
        score(reward, images, prompts).detach(),
        float(K * per_step),
        {"scale": scale, "schedule": schedule},
    )
