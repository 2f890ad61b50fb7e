"""The PPO family on a denoising chain's per-step log-probs: DDPO, GRPO, LOOP, REINFORCE, DPPO and
ReinFlow are this one objective with different advantage estimators and options.

    M  rows of the minibatch    S  steps per row    P = M * S  (row, step) pairs    K  chain steps

For row b (a trajectory) and chain step k, with old log-prob log pi_old from sampling:

    ratio_{b,k} = exp(log pi_theta(x_{k+1} | x_k, c) - log pi_old(x_{k+1} | x_k, c))

``ratio_scope: step`` (DDPO eq. 4, Black et al. 2023; Flow-GRPO; DPPO, Ren et al. 2024): one ratio
per pair, each with the row's advantage A_b, in DPPO weighted by the denoising discount
gamma_d ** (K - 1 - k) (later, less noisy steps weigh more). ``ratio_scope: chain`` (ReinFlow,
Zhang et al. 2025): one ratio per row, the log-probs of its stochastic steps summed (so is the
KL term; the entropy term is the mean over those steps).

    PPO-clip  loss_pg = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))  (Schulman et al. 2017, eq. 7)
    REINFORCE loss_pg = mean -A ratio (clip_range null)
    KL        loss_kl = beta mean KL(pi_theta || pi_ref), closed form for the two Gaussians of a step
    entropy   loss_entropy = -c_ent mean H(pi_theta) (a learned std: ReinFlow's bonus)

plus the family's optional terms (advantage normalization, value loss, BC, critic warmup; see
:mod:`flowrl.objectives.base`). The clip range is on the scale of the sampler's log-prob
reduction (``sampler.logprob_reduction``: mean makes it per dimension, as DDPO's 1e-4 assumes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.gaussian import gaussian_entropy, gaussian_kl
from flowrl.core.losses import policy_loss
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class PPOOptions:
    # step: one ratio per (trajectory, denoising step) pair (DDPO, Flow-GRPO, DPPO); chain: one per
    # trajectory, the log-probs of its K steps summed (ReinFlow)
    ratio_scope: str = "step"
    # fraction of the K denoising steps trained per trajectory (DDPO's timestep_fraction)
    timestep_fraction: float = 1.0
    # DPPO: advantages of denoising step k weighted by this ** (K - 1 - k) (DPPO's gamma_denoising 0.99)
    denoising_discount: float = 1.0
    # coefficient beta of the closed-form KL to the reference policy (0 = off)
    kl_coef: float = 0.0
    # entropy bonus on the step's std (ReinFlow hopper: 0.03; 0 = off)
    ent_coef: float = 0.0


class PPO(Objective):
    """PPO-clip / REINFORCE on per-step Gaussian log-probs (see the module docstring)."""

    Options = PPOOptions
    needs_log_probs = True

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        if o.ratio_scope not in ("step", "chain"):
            raise ConfigError(f"algorithm.ratio_scope must be 'step' or 'chain', got {o.ratio_scope!r}")
        if not 0 < o.timestep_fraction <= 1:
            raise ConfigError(
                f"algorithm.timestep_fraction must be in (0, 1], got {o.timestep_fraction}; "
                "set 1.0 to train every denoising step"
            )
        if not 0 < o.denoising_discount <= 1:
            raise ConfigError(f"algorithm.denoising_discount must be in (0, 1], got {o.denoising_discount}")
        if o.kl_coef < 0:
            raise ConfigError(
                f"algorithm.kl_coef must be >= 0, got {o.kl_coef}: a negative KL weight pushes away from the "
                "reference; set 0 (off) or a small positive value such as 0.04"
            )
        if o.ent_coef < 0:
            raise ConfigError(f"algorithm.ent_coef must be >= 0, got {o.ent_coef}")
        if o.ratio_scope == "chain" and cfg.train.minibatch_unit == "pair":
            raise ConfigError(
                "algorithm.ratio_scope=chain sums each trajectory's log-probs, so its minibatches hold whole "
                "trajectories: set train.minibatch_unit=trajectory (or algorithm.ratio_scope=step)"
            )

    @property
    def steps(self) -> str:
        return "all" if self.options.ratio_scope == "chain" else "sampled"

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_coef > 0

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        if not torch.isfinite(chain.log_probs).any(1).all():
            raise ConfigError(
                "the sampler produced no stochastic step to train on (check sampler.eta / noise_level / sde_window)"
            )

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o, device = self.options, chain.latents.device
        M, S = mb.steps.shape
        rows = mb.rows.to(device, non_blocking=True)
        terms: dict[str, Tensor] = {}
        if self.trains_policy(epoch):
            adv = self.minibatch_advantages(chain, rows)  # (M,)
            b, k = mb.rows.repeat_interleave(S), mb.steps.reshape(-1)  # (P,) each, CPU
            # 1. log pi_theta of each pair under the current parameters, in one forward
            out = self.sampler.log_prob(self.adapter, chain, k, traj_index=b)
            b_dev, k_dev = b.to(device, non_blocking=True), k.to(device, non_blocking=True)
            old = chain.log_probs[b_dev, k_dev]  # (P,)
            # 2. one ratio per pair (step scope) or per row (chain scope), with its advantage
            if o.ratio_scope == "step":
                new, adv = out.log_prob, adv.repeat_interleave(S)
                if o.denoising_discount != 1.0:
                    adv = adv * o.denoising_discount ** (chain.num_steps - 1 - k_dev).float()
            else:
                new, old = out.log_prob.view(M, S).sum(1), old.view(M, S).sum(1)
            # 3. optional terms: closed-form KL to the reference, the entropy of a learned std
            kl = entropy = None
            if o.kl_coef > 0:
                red = self.sampler.logprob_reduction
                ref = self.sampler.log_prob(self.adapter, chain, k, traj_index=b, reference=True)
                kl = gaussian_kl(out.mean, ref.mean.detach(), out.std, red)
                kl = kl if o.ratio_scope == "step" else kl.view(M, S).sum(1)
            if o.ent_coef > 0:
                entropy = gaussian_entropy(out.std, out.mean.shape[1:], self.sampler.logprob_reduction)
                entropy = entropy.view(M, -1).mean(1) if o.ratio_scope == "chain" else entropy
            terms = policy_loss(new, old, adv, self.algo.clip_range, kl, o.kl_coef, entropy, o.ent_coef)
            self.add_bc(terms, generator)
        return self.with_value(terms, chain, rows)
