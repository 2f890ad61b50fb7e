"""The PPO family on a denoising chain's per-step log-probs: DDPO, GRPO, LOOP, REINFORCE, DPPO and
ReinFlow are this one objective with different advantage estimators and options.

    M  rows of the minibatch    S  steps per row    P = M * S  (row, step) pairs    K  chain steps

For row b (a trajectory) and chain step k, with old log-prob log pi_old from sampling:

    ratio_{b,k} = exp(log pi_theta(x_{k+1} | x_k, c) - log pi_old(x_{k+1} | x_k, c))

``ratio_scope: step`` (DDPO eq. 4, Black et al. 2023; Flow-GRPO; DPPO, Ren et al. 2024): one ratio
per pair, each with the row's advantage A_b, in DPPO weighted by the denoising discount
gamma_d ** (K - 1 - k) (later, less noisy steps weigh more). ``ratio_scope: chain`` (ReinFlow,
Zhang et al. 2025): one ratio per row from the log-prob of its S stochastic steps, summed
(``chain_logprob: sum``; the KL term summed too, the entropy the steps' mean) or as ReinFlow's
code (``chain_logprob: reinflow``: (log N(x_0; 0, I) + the steps') / (S + 1), new and old clamped
to ``chain_logprob_clip``; the KL / (S + 1), the entropy rate (H(x_0) + sum_k H_k) / (S + 1)).
``kl_estimator: flow_grpo`` divides the KL by Flow-GRPO's sigma_s^2 instead of the transition's
variance (docs/faithful.md).

Per-step or per-trajectory clipping: ``step`` clips each step's ratio; ``chain`` clips once per
trajectory, the ratio exp(sum_k log pi_theta - sum_k log pi_old) over the trajectory's trained
(stochastic) steps, on text-to-image chains (DDIM, the flow SDE/CPS, MixGRPO's window) as on robot
policies. Its log-ratio sums S steps, so the same clip range is a tighter trust region per step.

GRPO-Guard (Wang et al. 2025, arXiv 2510.22319; ``ratio_norm``, ``step_weight: inv_dt``, step scope,
flow samplers). With the same std s under both policies and x' = mu_old + s eps, a step's log-ratio
is <eps, Delta> / s - |Delta|^2 / (2 s^2), Delta = mu_theta - mu_old (<.>, |.|^2 reduced over the
event as the log-prob): its mean is below 0 and its spread ~ 1 / s differs from step to step.
RatioNorm centres and rescales it:

    ratio_{b,k} = exp((log pi_theta - log pi_old + |mu_theta - mu_old|^2 / (2 s_k^2)) * s_k)   (= exp(<eps, Delta>))

with mu_old the sampling policy's mean (recomputed once per epoch in ``prepare``) and s_k the step's
std sigma_k sqrt(|dt_k|); ``step_weight: inv_dt`` divides step k's PPO term by |dt_k| (their gradient
reweighting across noise levels), as their reference computes it per timestep.

    PPO-clip  loss_pg = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))  (Schulman et al. 2017, eq. 7)
    REINFORCE loss_pg = mean -A ratio (clip_range null)
    KL        loss_kl = beta mean KL(pi_theta || pi_ref), closed form for the two Gaussians of a step
    entropy   loss_entropy = -c_ent mean H(pi_theta) (a learned std: ReinFlow's bonus)

plus the family's optional terms (advantage normalization, value loss, BC, critic warmup; see
:mod:`flowrl.objectives.base`). The clip range is on the scale of the sampler's log-prob
reduction (``sampler.logprob_reduction``: mean makes it per dimension, as DDPO's 1e-4 assumes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.gaussian import gaussian_entropy, gaussian_kl, gaussian_log_prob, reduce_event
from flowrl.core.losses import policy_loss
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class PPOOptions:
    # step: one ratio per (trajectory, denoising step) pair (DDPO, Flow-GRPO, DPPO); chain: one per
    # trajectory, from the log-prob of its whole chain (ReinFlow)
    ratio_scope: str = "step"
    # chain scope: the chain's log-prob is the sum of its steps' (sum), or ReinFlow's (reinflow: the
    # initial noise's log N(x_0; 0, I) plus the K steps', divided by K + 1; its default)
    chain_logprob: str = "sum"
    # chain scope: clamp the chain's new and old log-probs to [lo, hi] before the ratio (ReinFlow's
    # logprob_min / logprob_max: [-1, 1]; null = no clamp)
    chain_logprob_clip: list[float] | None = None
    # floor(timestep_fraction x K) denoising steps trained per trajectory, at most its stochastic
    # steps (DDPO's and Flow-GRPO's int(num_steps x timestep_fraction))
    timestep_fraction: float = 1.0
    # which steps: random (each trajectory its own random subset: DDPO) | first (the first ones, in
    # order: Flow-GRPO, whose 0.99 leaves out the last step)
    timestep_selection: str = "random"
    # DPPO: advantages of denoising step k weighted by this ** (K - 1 - k) (DPPO's gamma_denoising 0.99)
    denoising_discount: float = 1.0
    # coefficient beta of the closed-form KL to the reference policy (0 = off)
    kl_coef: float = 0.0
    # the KL term: exact (||mu - mu_ref||^2 / (2 std^2), the transitions' KL) | flow_grpo (flow samplers:
    # Flow-GRPO's code divides by 2 sigma_s^2, the SDE's noise scale without the step's |dt|, so its
    # beta 0.04 is |dt| x an exact-KL beta)
    kl_estimator: str = "exact"
    # entropy bonus on the step's std (ReinFlow hopper: 0.03; 0 = off)
    ent_coef: float = 0.0
    # GRPO-Guard's RatioNorm: each step's log-ratio + |mu_theta - mu_old|^2 / (2 std^2), times the step's std,
    # so every step's ratio is centred on 1 with one spread (flow_sde, or flow_cps with cps_logprob normalized)
    ratio_norm: bool = False
    # per-step weight of the PPO term: none | inv_dt (GRPO-Guard: step k's term / |dt_k|, flow samplers)
    step_weight: str = "none"
    # DPPO's clip schedule over the K recorded denoising steps (step scope): step k's clip range goes from this
    # (k = 0, the noisiest) to algorithm.clip_range (the last), base + (clip - base) (e^{r t} - 1) / (e^r - 1),
    # t = k / (K - 1) (DPPO's clip_ploss_coef_base, 1e-3 in its robomimic configs; null = one clip range)
    clip_range_base: float | None = None
    # the schedule's rate r (DPPO's clip_ploss_coef_rate 3)
    clip_range_rate: float = 3.0
    # DPPO: clamp each minibatch's (normalized) advantages to their [lo, hi] quantiles (its
    # clip_advantage_lower/upper_quantile; null = off, as [0, 1])
    adv_quantiles: list[float] | None = None


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
        if o.chain_logprob not in ("sum", "reinflow"):
            raise ConfigError(f"algorithm.chain_logprob must be 'sum' or 'reinflow', got {o.chain_logprob!r}")
        if o.ratio_scope == "step" and (o.chain_logprob != "sum" or o.chain_logprob_clip is not None):
            raise ConfigError(
                "algorithm.chain_logprob and chain_logprob_clip shape a chain-scope ratio, but ratio_scope=step; "
                "set algorithm.chain_logprob=sum and algorithm.chain_logprob_clip=null (or ratio_scope=chain)"
            )
        if o.chain_logprob == "reinflow" and cfg.sampler.name not in ("reinflow", "euler", "flow_noise"):
            raise ConfigError(
                "algorithm.chain_logprob=reinflow adds the initial noise's N(0, I) log-density, which only a "
                f"flow policy's chain starts from; sampler {cfg.sampler.name!r} needs algorithm.chain_logprob=sum"
            )
        clip = o.chain_logprob_clip
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ConfigError(
                f"algorithm.chain_logprob_clip must be [lo, hi] with lo < hi, or null; got {clip}"
            )
        if o.timestep_selection not in ("random", "first"):
            raise ConfigError(
                f"algorithm.timestep_selection must be 'random' or 'first', got {o.timestep_selection!r}"
            )
        if o.kl_estimator not in ("exact", "flow_grpo"):
            raise ConfigError(
                f"algorithm.kl_estimator must be 'exact' or 'flow_grpo', got {o.kl_estimator!r}"
            )
        if o.kl_estimator == "flow_grpo" and cfg.sampler.name not in ("flow_sde", "flow_cps"):
            raise ConfigError(
                f"algorithm.kl_estimator=flow_grpo is Flow-GRPO's KL of a flow SDE/CPS step; sampler "
                f"{cfg.sampler.name!r} needs algorithm.kl_estimator=exact"
            )
        if o.step_weight not in ("none", "inv_dt"):
            raise ConfigError(f"algorithm.step_weight must be 'none' or 'inv_dt', got {o.step_weight!r}")
        if (o.ratio_norm or o.step_weight != "none") and o.ratio_scope != "step":
            raise ConfigError(
                "algorithm.ratio_norm and step_weight (GRPO-Guard) shape per-step ratios; set algorithm.ratio_scope=step"
            )
        gaussian = cfg.sampler.name == "flow_sde" or (
            cfg.sampler.name == "flow_cps" and cfg.sampler.cps_logprob == "normalized"
        )
        if o.ratio_norm and not gaussian:
            raise ConfigError(
                f"algorithm.ratio_norm (GRPO-Guard) centres a flow step's Gaussian log-ratio; sampler "
                f"{cfg.sampler.name!r} needs sampler.name=flow_sde (or flow_cps with sampler.cps_logprob=normalized)"
            )
        if o.step_weight == "inv_dt" and cfg.sampler.name not in ("flow_sde", "flow_cps"):
            raise ConfigError(
                f"algorithm.step_weight=inv_dt divides by a flow step's |dt|; sampler {cfg.sampler.name!r} needs "
                "algorithm.step_weight=none (or a flow sampler)"
            )
        if o.clip_range_base is not None and (
            o.ratio_scope != "step" or cfg.algorithm.clip_range is None or o.clip_range_base <= 0
        ):
            raise ConfigError(
                f"algorithm.clip_range_base={o.clip_range_base} schedules a per-step clip range from it to "
                "algorithm.clip_range (DPPO): it needs ratio_scope=step, a clip_range and a base > 0 (DPPO: 1e-3)"
            )
        q = o.adv_quantiles
        if q is not None and (len(q) != 2 or not 0 <= q[0] < q[1] <= 1 or o.ratio_scope != "step"):
            raise ConfigError(
                f"algorithm.adv_quantiles must be [lo, hi] with 0 <= lo < hi <= 1 (ratio_scope=step), or null; got {q}"
            )
        if o.ratio_scope == "chain" and o.timestep_fraction != 1.0:
            raise ConfigError(
                f"algorithm.ratio_scope=chain takes one ratio over all of a trajectory's stochastic steps, so "
                f"algorithm.timestep_fraction={o.timestep_fraction} would be ignored; set it to 1.0 (or ratio_scope=step)"
            )
        if o.ratio_scope == "chain" and cfg.train.minibatch_unit == "pair":
            raise ConfigError(
                "algorithm.ratio_scope=chain sums each trajectory's log-probs, so its minibatches hold whole "
                "trajectories: set train.minibatch_unit=trajectory (or algorithm.ratio_scope=step)"
            )

    @property
    def steps(self) -> str:
        return "all" if self.options.ratio_scope == "chain" else "sampled"

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        return cfg.algorithm.options.kl_coef > 0  # the closed-form KL's log pi_ref

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        if not torch.isfinite(chain.log_probs).any(1).all():
            raise ConfigError(
                "the sampler produced no stochastic step to train on (check sampler.eta / noise_level / sde_window)"
            )
        if self.options.ratio_norm:
            self._old_means(chain)

    @torch.no_grad()
    def _old_means(self, chain: Chain) -> None:
        """GRPO-Guard: the sampling policy's mean of every stochastic step, ``metadata["old_means"]``
        (B, K_s, *event) over the K_s columns with a log-prob (``old_mean_column`` maps a step to its
        column), in forwards of train.minibatch_size pairs."""
        finite = torch.isfinite(chain.log_probs).cpu()  # (B, K)
        cols = finite.any(0)
        column = torch.full((chain.num_steps,), -1, dtype=torch.long)
        column[cols] = torch.arange(int(cols.sum()))
        means = torch.zeros(
            len(chain), int(cols.sum()), *chain.latents.shape[2:], device=chain.latents.device
        )
        b, k = finite.nonzero(as_tuple=True)
        size = max(1, getattr(self.cfg.train, "minibatch_size", len(chain)))
        for i in range(0, len(b), size):
            bi, ki = b[i : i + size], k[i : i + size]
            out = self.sampler.log_prob(self.adapter, chain, ki, traj_index=bi)
            means[bi.to(means.device), column[ki].to(means.device)] = out.mean.float()
        chain.metadata["old_means"], chain.metadata["old_mean_column"] = means, column

    def _chain(self, per_step: Tensor, prior) -> Tensor:
        """(M, S) per-step terms -> (M,) the chain's: their sum, or ReinFlow's (prior + sum) / (S + 1)."""
        if self.options.chain_logprob == "sum":
            return per_step.sum(1)
        return (per_step.sum(1) + prior) / (per_step.shape[1] + 1)

    def _prior(self, chain: Chain, rows: Tensor, term):
        """``term`` of the rows' initial noise x_0 (the chain's first state), for ReinFlow's chain log-prob."""
        if self.options.chain_logprob == "sum":
            return 0.0
        return term(chain.latents[rows, 0].float())

    def _ratio_norm(self, chain: Chain, out, b: Tensor, k: Tensor, log_ratio: Tensor) -> Tensor:
        """(P,) (log-ratio + |mu_theta - mu_old|^2 / (2 s^2)) * s, s the pairs' transition std."""
        column = chain.metadata["old_mean_column"][k].to(b.device)
        mu_old = chain.metadata["old_means"][b, column]
        std = out.std.float().reshape(len(b), -1)[:, 0]  # the step's scalar std (the flow samplers')
        bias = reduce_event((out.mean.float() - mu_old) ** 2, self.sampler.logprob_reduction) / (2 * std**2)
        return (log_ratio + bias) * std

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o, device = self.options, chain.latents.device
        M, S = mb.steps.shape
        rows = mb.rows.to(device, non_blocking=True)
        terms: dict[str, Tensor] = {}
        red, one = self.sampler.logprob_reduction, torch.ones((), device=device)
        if self.trains_policy(epoch):
            clip = self.algo.clip_range  # a float, or (P,) per pair with DPPO's clip schedule
            adv = self.minibatch_advantages(chain, rows)  # (M,)
            b, k = mb.rows.repeat_interleave(S), mb.steps.reshape(-1)  # (P,) each, CPU
            # 1. log pi_theta of each pair under the current parameters, in one forward
            out = self.sampler.log_prob(self.adapter, chain, k, traj_index=b)
            b_dev, k_dev = b.to(device, non_blocking=True), k.to(device, non_blocking=True)
            old = chain.log_probs[b_dev, k_dev]  # (P,)
            # 2. one ratio per pair (step scope) or per row (chain scope), with its advantage
            if o.ratio_scope == "step":
                new, adv = out.log_prob, self.pair_advantages(chain, mb, adv)  # (P,)
                if o.adv_quantiles is not None:  # DPPO: the minibatch's advantages clamped to its quantiles
                    lo, hi = torch.quantile(adv, torch.tensor(o.adv_quantiles, device=adv.device))
                    adv = adv.clamp(lo, hi)
                if o.clip_range_base is not None and chain.num_steps > 1:  # DPPO's clip schedule over steps
                    base, r = o.clip_range_base, o.clip_range_rate
                    t = k_dev.float() / (chain.num_steps - 1)
                    clip = base + (self.algo.clip_range - base) * torch.expm1(r * t) / math.expm1(r)
                if o.denoising_discount != 1.0:
                    adv = adv * o.denoising_discount ** (chain.num_steps - 1 - k_dev).float()
                # GRPO-Guard's RatioNorm: the log-ratio centred, on the scale of the step's std
                if o.ratio_norm:
                    new, old = self._ratio_norm(chain, out, b_dev, k, new - old), torch.zeros_like(old)
                if o.step_weight == "inv_dt":  # w_p max(-A r, -A clip(r)) = max(-(w_p A) r, ...) for w_p > 0
                    adv = adv / self.sampler.step_dt(k).to(device, non_blocking=True)
            else:
                prior = self._prior(
                    chain, rows, lambda x0: gaussian_log_prob(x0, torch.zeros_like(x0), one, red)
                )
                new, old = self._chain(out.log_prob.view(M, S), prior), self._chain(old.view(M, S), prior)
                if o.chain_logprob_clip is not None:
                    lo, hi = o.chain_logprob_clip
                    new, old = new.clamp(lo, hi), old.clamp(lo, hi)
            # 3. optional terms: closed-form KL to the reference, the entropy of a learned std
            kl = entropy = None
            if o.kl_coef > 0:
                ref = self.sampler.log_prob(self.adapter, chain, k, traj_index=b, reference=True)
                std = out.std if o.kl_estimator == "exact" else self.sampler.flow_grpo_kl_std(k, out.std)
                kl = gaussian_kl(out.mean, ref.mean.detach(), std, red)
                kl = kl if o.ratio_scope == "step" else self._chain(kl.view(M, S), 0.0)
            if o.ent_coef > 0:
                entropy = gaussian_entropy(out.std, out.mean.shape[1:], red)
                if o.ratio_scope == "chain" and o.chain_logprob == "sum":
                    entropy = entropy.view(M, S).mean(1)  # the steps' mean
                elif o.ratio_scope == "chain":  # ReinFlow's entropy rate (H(x_0) + sum_k H_k) / (K + 1)
                    h0 = self._prior(
                        chain, rows, lambda x0: gaussian_entropy(torch.ones_like(x0), x0.shape[1:], red)
                    )
                    entropy = self._chain(entropy.view(M, S), h0)
            terms = policy_loss(new, old, adv, clip, kl, o.kl_coef, entropy, o.ent_coef)
            self.add_bc(terms, generator)
        return self.with_value(terms, chain, rows)
