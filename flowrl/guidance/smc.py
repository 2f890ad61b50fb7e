"""Sequential Monte Carlo with reward potentials (Feynman-Kac steering, Singhal et al. 2025,
https://arxiv.org/abs/2501.06848; twisted SMC, Wu et al. 2023).

P particles per prompt run the sampler side by side. Every ``resample_every`` steps each particle
is scored at its predicted clean sample, r_k = r(decode(x0_hat_k)), and weighted by a potential:

    difference : G_k = exp(lambda * (r_k - r_{k_prev}))       (telescopes to exp(lambda r at the last scored step))
    immediate  : G_k = exp(lambda * r_k)
    max        : G_k = exp(lambda * max(r_<=k))

log-weights accumulate log G and are normalized per prompt (softmax), the effective sample size
is ESS = 1 / sum w^2, and when ESS < ess_threshold * P the particles are resampled
(systematic resampling) and their weights reset to uniform. The particle count never changes.
At the end each prompt returns its highest-reward particle. Any reward works (no gradient).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from flowrl.core.seeding import draw_device, randn
from flowrl.guidance.common import GuidanceResult, score

POTENTIALS = ("difference", "immediate", "max")


def systematic_resample(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(G, P) normalized weights -> (G, P) ancestor indices, one uniform offset per group."""
    G, P = weights.shape
    where = draw_device(generator, weights.device)
    u = (
        torch.rand(G, 1, generator=generator, device=where).to(weights.device)
        + torch.arange(P, device=weights.device)
    ) / P
    cdf = weights.cumsum(dim=1)
    cdf[:, -1] = 1.0  # guard against round-off
    return torch.searchsorted(cdf, u).clamp(max=P - 1)


@torch.no_grad()
def smc_guidance(
    sampler,
    adapter,
    reward,
    prompts: list[str],
    num_particles: int = 4,
    lam: float = 10.0,
    potential: str = "difference",
    resample_every: int = 1,
    ess_threshold: float = 0.5,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> GuidanceResult:
    """One sample per prompt (or observation history) from ``num_particles`` reward-steered
    particles; ``deterministic`` runs every step's mean (resampled copies then stay identical)."""
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    device, G, P, K = adapter.device, len(prompts), num_particles, sampler.num_steps
    particles_prompts = [p for p in prompts for _ in range(P)]  # (G * P,), prompt-major
    cond = adapter.condition(particles_prompts, guidance_scale)
    x = randn((G * P, *adapter.latent_shape), generator, device)
    log_w = torch.zeros(G, P, device=device)
    prev_r = torch.zeros(G, P, device=device)
    best_r = torch.full((G, P), -float("inf"), device=device)
    stochastic = set() if deterministic else sampler.stochastic_steps(generator)
    if not stochastic or getattr(sampler, "eta", None) == 0:
        warnings.warn(
            "smc_guidance: the chain draws no noise (deterministic, eta 0 or noise level 0), so resampled "
            "particles stay identical copies and the result is best-of-N's; sample with noise (eta 1, the "
            "flow samplers' noise level)",
            stacklevel=2,
        )
    ess_history, resampled_at, reward_evals = [], [], 0
    for k in range(K):
        kb = torch.full((G * P,), k, dtype=torch.long)
        noisy = k in stochastic
        out = sampler.predict(adapter, x, kb, cond, guidance_scale, stochastic=noisy)
        step = sampler.transition(kb, out, x, cond, generator=generator, stochastic=noisy)
        x = step.prev_sample
        if (k + 1) % resample_every or k == K - 1:
            continue
        # 1. potentials at the predicted clean samples
        r = score(reward, adapter.decode(step.pred_original_sample), particles_prompts).view(G, P)
        reward_evals += 1
        best_r = torch.maximum(best_r, r)
        log_g = {"difference": r - prev_r, "immediate": r, "max": best_r}[potential] * lam
        prev_r = r
        # 2. normalized weights and effective sample size, per prompt
        log_w = torch.log_softmax(log_w + log_g, dim=1)
        w = log_w.exp()
        ess = 1.0 / (w**2).sum(dim=1)  # (G,)
        ess_history.append(ess.cpu())
        # 3. resample where the ESS fell below the threshold
        need = ess < ess_threshold * P
        if need.any():
            idx = systematic_resample(w, generator)
            idx = torch.where(need[:, None], idx, torch.arange(P, device=device).expand(G, P))
            flat = (idx + torch.arange(G, device=device)[:, None] * P).flatten()  # (G * P,)
            x, prev_r, best_r = x[flat], prev_r.flatten()[flat].view(G, P), best_r.flatten()[flat].view(G, P)
            log_w = torch.where(
                need[:, None], torch.full_like(log_w, -torch.log(torch.tensor(float(P)))), log_w
            )
            resampled_at.append(k)
    images = adapter.decode(x)
    final = score(reward, images, particles_prompts).view(G, P)
    best = final.argmax(dim=1)
    pick = torch.arange(G, device=device) * P + best
    cfg_factor = 2 if guidance_scale > 1 and getattr(adapter, "uses_cfg", True) else 1
    return GuidanceResult(
        latents=x[pick],
        images=images[pick],
        rewards=final.gather(1, best[:, None]).squeeze(1),
        nfe=float(P * K * cfg_factor),
        info={
            "weights": log_w.exp(),
            "ess": torch.stack(ess_history) if ess_history else torch.empty(0, G),
            "resampled_at": resampled_at,
            "num_particles": P,
            "reward_evals": reward_evals + 1,
            "final_rewards": final,
        },
    )
