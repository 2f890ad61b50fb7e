"""FIND: a policy over the initial noise of a frozen denoiser (Chen et al. 2024, arXiv 2407.19453).

    M  rows of the minibatch (whole trajectories)    event  the latent's shape (C, H, W)

The denoising chain becomes a one-step MDP: the state is the prompt c, the one action is the
initial noise x_T ~ pi_phi(. | c) = N(mu_phi(c), sigma_phi(c)^2 I) (:mod:`flowrl.models.noise_policy`),
everything after it is the frozen model's chain (DDIM with the sampler's eta) and the reward
scores its image. The action's log-density is exact, reduced over the event as
``sampler.logprob_reduction`` says (FIND's code: the mean over C, H, W):

    ratio_b  = exp(log pi_phi(x_T,b | c_b) - log pi_ref(x_T,b | c_b))
    pi_ref   = N(0, I), the initial distribution (noise_ratio: prior, FIND's code: its old mean and
               std are the initial ones, never updated), or the epoch's sampling policy
               (noise_ratio: sampling, PPO's: the ratio is 1 on-policy)
    loss_pg  = mean_b -w A_b clamp(ratio_b, 1 - eps, 1 + eps)      (noise_clip: clamp, FIND's code)
             = mean_b max(-w A_b ratio_b, -w A_b clamp(ratio_b, ...))  (noise_clip: ppo, Schulman et al.)
             = mean_b -w A_b ratio_b                               (clip_range: null)
    loss_reg = mean over the rows and the event of (mu - 0)^2 + (sigma - 1)^2   (noise_reg: params,
               FIND's "kl_regularizer"), or of KL(N(mu, sigma^2) || N(0, 1)) =
               (mu^2 + sigma^2 - 1) / 2 - log sigma, reduced like the log-probs (noise_reg: kl)
    loss     = loss_pg + noise_reg_coef * loss_reg

with w = ``reward_weight`` (FIND: 10), eps = ``algorithm.clip_range`` (FIND's ratio_clip 0.2) and
A the collector's advantages. FIND's "dynamic reward calibration" subtracts a learned prediction
of the prompt's expected reward from the reward; flowrl's default estimator for it is the
leave-one-out mean of the other samples of the same prompt draw (an unbiased estimate of the same
expectation under the current policy, without a network; docs/faithful.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.gaussian import gaussian_log_prob, reduce_event
from flowrl.core.losses import policy_loss
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class FINDOptions:
    # the ratio's denominator: prior (N(0, I), the initial distribution: FIND's code) | sampling (the
    # epoch's sampling policy: PPO's, ratio 1 on-policy)
    noise_ratio: str = "prior"
    # clamp (-w A clamp(ratio): FIND's code, no gradient outside the range) | ppo (PPO's pessimistic max)
    noise_clip: str = "clamp"
    # the pull towards N(0, I): params (mean (mu - 0)^2 + (sigma - 1)^2: FIND's code) | kl (the exact KL)
    noise_reg: str = "params"
    # its weight (FIND's kl_weight 0.01; 0 = off)
    noise_reg_coef: float = 0.01
    # w, the policy-gradient term's weight (FIND's reward_weight 10)
    reward_weight: float = 10.0


class FIND(Objective):
    """The initial-noise policy's ratio loss (see the module docstring)."""

    Options = FINDOptions
    needs_log_probs = False  # the chain's own steps are not trained: only x_T's density is used

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        for key, allowed in (
            ("noise_ratio", ("prior", "sampling")),
            ("noise_clip", ("clamp", "ppo")),
            ("noise_reg", ("params", "kl")),
        ):
            if getattr(o, key) not in allowed:
                raise ConfigError(f"algorithm.{key} must be {' or '.join(allowed)}, got {getattr(o, key)!r}")
        if o.noise_reg_coef < 0:
            raise ConfigError(f"algorithm.noise_reg_coef must be >= 0 (0 = off), got {o.noise_reg_coef}")
        if o.reward_weight <= 0:
            raise ConfigError(f"algorithm.reward_weight must be > 0, got {o.reward_weight}; FIND uses 10")
        if cfg.train.minibatch_unit != "trajectory":
            raise ConfigError(
                "FIND trains one action per trajectory (its initial noise): set train.minibatch_unit=trajectory"
            )

    @property
    def steps(self) -> str:
        return "none"

    @property
    def policy(self):
        policy = getattr(self.adapter, "noise_policy", None)
        if policy is None:
            raise ConfigError(
                "algorithm.name=find trains a noise policy: set model.noise_policy=free or conditional"
            )
        return policy

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        """The sampling policy's log-density of each x_T (noise_ratio: sampling), row by row as the
        minibatches will evaluate it, so the first pass's ratio is exactly 1."""
        self._old = None
        if self.options.noise_ratio == "sampling":
            with torch.no_grad():
                self._old = torch.cat([self._log_prob(chain, torch.tensor([b])) for b in range(len(chain))])

    def _log_prob(self, chain: Chain, rows: Tensor) -> Tensor:
        rows = rows.to(chain.latents.device)
        cond = {n: v[rows] for n, v in chain.cond.items()}
        x = chain.latents[rows, 0]
        return self.policy.log_prob(x, cond, self.sampler.logprob_reduction)

    def regularizer(self, mu: Tensor, std: Tensor) -> Tensor:
        """(M,) the pull of N(mu, sigma^2) towards N(0, I) (``noise_reg``)."""
        if self.options.noise_reg == "params":
            return reduce_event(mu**2 + (std - 1) ** 2, "mean")
        kl = 0.5 * (mu**2 + std**2 - 1) - std.log()
        return reduce_event(kl, self.sampler.logprob_reduction)

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o, device = self.options, chain.latents.device
        rows = mb.rows.to(device, non_blocking=True)
        x = chain.latents[rows, 0].float()
        cond = {n: v[rows] for n, v in chain.cond.items()}
        # 1. log pi_phi(x_T | c), one row at a time (the same arithmetic as prepare's: ratio 1 on-policy)
        new = torch.cat([self._log_prob(chain, mb.rows[i : i + 1]) for i in range(len(mb.rows))])
        if o.noise_ratio == "sampling":
            old = self._old.to(device)[rows]
        else:
            one = torch.ones((), device=device)
            old = gaussian_log_prob(x, torch.zeros_like(x), one, self.sampler.logprob_reduction)
        # 2. the ratio term, with the advantage weighted by w
        adv = o.reward_weight * self.minibatch_advantages(chain, rows)
        eps = self.algo.clip_range
        terms = policy_loss(new, old, adv, eps if o.noise_clip == "ppo" else None)
        if o.noise_clip == "clamp" and eps is not None:
            ratio = torch.exp(new - old)
            terms["loss_pg"] = (-adv * ratio.clamp(1.0 - eps, 1.0 + eps)).mean()
            terms["clipfrac"] = ((ratio - 1.0).abs() > eps).float().mean().detach()
        # 3. the pull towards N(0, I)
        mu, std = self.policy.distribution(cond, len(rows))
        reg = self.regularizer(mu, std).mean()
        terms["loss_reg"] = reg.detach()
        terms["loss"] = terms["loss_pg"] + o.noise_reg_coef * reg
        terms["noise_mean_abs"] = mu.detach().abs().mean()
        terms["noise_std_mean"] = std.detach().mean()
        return terms
