"""Flow Policy Optimization (FPO; McAllister et al. 2025, "Flow Matching Policy Gradients",
arXiv 2507.21053): PPO's clipped surrogate with a ratio built from the flow-matching loss of the
final sample, so it needs no per-step likelihood and works with any sampler that defines a
denoising loss (DDIM, flow, Euler, DDPM; the deterministic ODE included; not LCM or ReinFlow).

    M  rows of the minibatch   N  Monte Carlo (step, noise) pairs per row (``num_mc_samples``)

At the start of the epoch (parameters = the sampling policy's), for each trajectory's final
sample x0 draw N pairs (k_i, eps_i), k_i uniform over the sampler's steps (the reference's
``discretize_t_for_training``), and keep the old losses l_old_i = l_theta_old(x0, k_i, eps_i). Each
update then recomputes l_new_i with the same pairs (the sampler's ``denoising_loss``, by default
the noise the prediction implies, the reference's ``u_but_supervise_as_eps``) and

    ratio_average    = exp(mean_i l_old_i - mean_i l_new_i)                         (FPO, eq. 7-8)
    ratio_per_sample = exp(clamp(l_old_i - l_new_i, -3, 3)),  one per pair           (FPO++)

    ppo   loss_pg = mean max(-A r, -A clip(r, 1 - eps, 1 + eps))
    aspo  the PPO clip for A >= 0, and SPO's penalty for A < 0:                       (FPO++)
          loss_pg = mean -(A r - |A| (r - 1)^2 / (2 eps))   (Xie et al. 2024, Simple Policy Optimization)

plus the family's optional terms (advantage normalization, value loss, BC; see
:mod:`flowrl.objectives.base`). ``algorithm.name: fpo`` is the reference's defaults (average
ratio, PPO clip, clip range 0.05); ``fpo++`` the per-sample ratio with ASPO, as Yi, Choi et al.
2026 ("Flow Policy Gradients for Robot Control") describe them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core import seeding
from flowrl.core.losses import policy_loss
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class FPOOptions:
    # N, Monte Carlo (denoising step, noise) pairs per sample for the flow-matching loss (FPO: n_samples_per_action 8)
    num_mc_samples: int = 8
    # average: one ratio per sample from the pairs' mean losses (FPO); per_sample: one ratio per pair (FPO++)
    fpo_ratio: str = "average"
    # eps: the error of the noise the prediction implies (FPO's u_but_supervise_as_eps); model: of the network's own target
    fpo_loss: str = "eps"
    # ppo: the clipped surrogate; aspo: PPO's clip for positive advantages, SPO's penalty for negative (FPO++)
    trust_region: str = "ppo"


def spo_surrogate(ratio: Tensor, adv: Tensor, eps: float) -> Tensor:
    """Simple Policy Optimization's objective per element (to maximize): A r - |A| (r - 1)^2 / (2 eps)."""
    return adv * ratio - adv.abs() * (ratio - 1) ** 2 / (2 * eps)


class FPO(Objective):
    """FPO / FPO++ (see the module docstring)."""

    Options = FPOOptions
    needs_log_probs = False

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        if o.num_mc_samples < 1:
            raise ConfigError(f"algorithm.num_mc_samples must be >= 1, got {o.num_mc_samples}; FPO uses 8")
        for key, allowed in (
            ("fpo_ratio", ("average", "per_sample")),
            ("fpo_loss", ("eps", "model")),
            ("trust_region", ("ppo", "aspo")),
        ):
            if getattr(o, key) not in allowed:
                raise ConfigError(f"algorithm.{key} must be one of {list(allowed)}, got {getattr(o, key)!r}")
        if o.trust_region == "aspo" and cfg.algorithm.clip_range is None:
            raise ConfigError(
                "algorithm.trust_region=aspo needs algorithm.clip_range (SPO's penalty scale); set e.g. 0.05"
            )
        if cfg.sampler.name in ("lcm", "reinflow"):
            raise ConfigError(
                f"algorithm.name={cfg.algorithm.name} trains the model's flow-matching or diffusion loss, and "
                + (
                    "sampler.name=lcm has none; use a DDIM or flow chain"
                    if cfg.sampler.name == "lcm"
                    else "would leave ReinFlow's noise network untrained; set sampler.name=euler (exploration from x_0)"
                )
            )
        if cfg.train.minibatch_unit != "trajectory":
            raise ConfigError("FPO trains on whole samples: set train.minibatch_unit=trajectory")

    @property
    def steps(self) -> str:
        return "none"

    def _losses(self, chain: Chain, rows: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """(M, N) flow-matching losses of the rows' final samples at their N (step, noise) pairs."""
        M, N = k.shape
        x0 = chain.latents[rows, -1].repeat_interleave(N, 0)  # (M * N, *event)
        cond = {n: v[rows].repeat_interleave(N, 0) for n, v in chain.cond.items()}
        loss = self.sampler.denoising_loss(
            self.adapter,
            x0,
            cond,
            k.reshape(-1),
            noise.reshape(M * N, *noise.shape[2:]),
            chain.guidance_scale,
            self.options.fpo_loss,
        )
        return loss.view(M, N)

    @torch.no_grad()
    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        """Draw every sample's N (step, noise) pairs and their old losses, in minibatch-sized chunks."""
        B, N = len(chain), self.options.num_mc_samples
        K, device = self.sampler.num_steps, chain.latents.device
        k = torch.randint(0, K, (B, N), generator=generator)  # CPU, like every step index
        noise = seeding.randn((B, N, *chain.latents.shape[2:]), generator, device)
        old = torch.empty(B, N, device=device)
        size = self.cfg.train.minibatch_size
        for i in range(0, B, size):
            rows = torch.arange(i, min(i + size, B))
            old[rows] = self._losses(chain, rows.to(device), k[rows], noise[rows.to(device)])
        chain.metadata.update(fpo_steps=k, fpo_noise=noise, fpo_old=old)

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o, eps = self.options, self.algo.clip_range
        md, device = chain.metadata, chain.latents.device
        rows = mb.rows.to(device, non_blocking=True)
        terms: dict[str, Tensor] = {}
        if self.trains_policy(epoch):
            adv = self.minibatch_advantages(chain, rows)  # (M,)
            new_l = self._losses(chain, rows, md["fpo_steps"][mb.rows], md["fpo_noise"][rows])  # (M, N)
            old_l = md["fpo_old"][rows]
            # the ratio as a log-prob difference: log r = l_old - l_new
            if o.fpo_ratio == "average":
                new, old = -new_l.mean(1), -old_l.mean(1)
            else:
                old = -old_l.reshape(-1)
                new = old + (old_l - new_l).clamp(-3.0, 3.0).reshape(-1)
                adv = adv.repeat_interleave(new_l.shape[1])
            terms = policy_loss(new, old, adv, eps)
            if o.trust_region == "aspo":
                ratio = torch.exp(new - old)
                ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
                aspo = torch.where(adv >= 0, ppo, -spo_surrogate(ratio, adv, eps)).mean()
                terms["loss"], terms["loss_pg"] = aspo + terms["loss_kl"], aspo
            terms["loss_fm"] = new_l.mean().detach()
            self.add_bc(terms, generator)
        return self.with_value(terms, chain, rows)
