"""PRDP: proximal reward difference prediction (Deng et al. 2024, "PRDP: Proximal Reward Difference
Prediction for Large-Scale Reward Finetuning of Diffusion Models", arXiv 2402.08714, CVPR 2024).

    M  rows of the minibatch (whole prompt groups)   S  stochastic chain steps   G  group_size

The KL-regularized reward objective max E[r(x_0, c)] - beta KL(pi_theta || pi_ref) over whole chains
has the optimum pi* = pi_ref exp(r / beta) / Z(c), so for two chains a, b of one prompt
log pi*/pi_ref (a) - log pi*/pi_ref (b) = (r_a - r_b) / beta: Z(c) cancels. PRDP regresses the
model's chain log-ratio difference onto that reward difference (eq. 14), with a PPO-like proximal
clip of every step's log-ratio around the sampling policy's (eqs. 16-21). As its reference code
(the paper's appendix G, in Jax) computes it, for chain b and recorded step k:

    l_bk       = log pi_theta(x_{k+1} | x_k, c) - log pi_ref(x_{k+1} | x_k, c)
    l_bk^old   = log pi_old(x_{k+1} | x_k, c)   - log pi_ref(x_{k+1} | x_k, c)    (recorded at sampling)
    l_bk^clip  = clip(l_bk, l_bk^old - eps, l_bk^old + eps)                      (eps = algorithm.clip_range)
    d_b        = mean_k l_bk,   d_b^clip = mean_k l_bk^clip                       (the mean over the steps)
    loss_ab    = max((d_a - d_b - (r_a - r_b) / beta)^2, (d_a^clip - d_b^clip - (r_a - r_b) / beta)^2)
    loss       = mean over the minibatch's groups of mean over its ordered pairs with r_a > r_b

(the paper's text writes the sum over steps, its code the mean: the same loss with beta x S.)
pi_ref is the pre-trained model (the LoRA adapter disabled, or a frozen copy when fine-tuning
fully), its log-probs computed once per epoch; beta = ``algorithm.kl_coef``. With
``prdp_reference: sampling`` the reference is the sampling policy itself (l^old = 0: a
trust-region regression to the last snapshot; no reference forward). At the sampling parameters
l = l^old, so the clipped and unclipped losses are equal. Pairs of equal rewards are left out, as
in the reference code; rewards are the raw rewards (no advantage estimator). Each gradient step
in the paper covers the whole epoch's batch, K = 10 steps per epoch (small scale): here
``train.update_epochs`` passes with ``optim.gradient_accumulation_steps`` covering the epoch.
One forward carries every stochastic step of its rows (the squared loss does not split over steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective

REFERENCES = ("pretrained", "sampling")


@dataclass
class PRDPOptions:
    # beta, the KL weight: the loss regresses the chain log-ratio difference on (r_a - r_b) / beta
    # (PRDP small scale: 3e-5; large scale 3e-6, with mean-reduced per-step log-probs)
    kl_coef: float = 3e-5
    # the log-ratios' reference: pretrained (the paper: the adapter-disabled model or a frozen copy) |
    # sampling (the epoch's sampling policy: log pi_theta - log pi_old, no reference forward)
    prdp_reference: str = "pretrained"


def pair_losses(
    d: Tensor, d_clip: Tensor, rewards: Tensor, groups: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The PRDP loss of rows with chain log-ratios ``d`` / ``d_clip`` (M,), rewards (M,) and group
    ids (M,): the mean over groups of the mean over their ordered pairs with r_a > r_b of the max
    of the unclipped and clipped squared errors. Returns (loss, unclipped loss, pairs used)."""
    target = (rewards[:, None] - rewards[None, :]) / beta  # (M, M): (r_a - r_b) / beta
    mse = (d[:, None] - d[None, :] - target) ** 2
    mse_clip = (d_clip[:, None] - d_clip[None, :] - target) ** 2
    valid = (groups[:, None] == groups[None, :]) & (rewards[:, None] > rewards[None, :])  # (M, M)
    both = torch.maximum(mse, mse_clip)
    per_group, per_group_unclipped = [], []
    for gid in torch.unique(groups):
        in_g = valid & (groups == gid)[:, None]
        n = in_g.sum()
        if n == 0:
            continue  # every reward equal: no pair to predict
        per_group.append(torch.where(in_g, both, 0.0).sum() / n)
        per_group_unclipped.append(torch.where(in_g, mse, 0.0).sum() / n)
    if not per_group:
        zero = (d * 0.0).sum()  # keeps the graph: a minibatch without pairs trains nothing
        return zero, zero.detach(), torch.zeros(())
    return (
        torch.stack(per_group).mean(),
        torch.stack(per_group_unclipped).mean().detach(),
        valid.sum().float(),
    )


class PRDP(Objective):
    """Proximal reward difference prediction (see the module docstring)."""

    Options = PRDPOptions
    needs_log_probs = True
    whole_groups = True  # minibatches hold whole prompt groups (flowrl.train.plan)

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        # the log-ratios' log pi_ref; with prdp_reference: sampling they are taken against the epoch's
        # sampling policy and the reference is never called
        return cfg.algorithm.options.prdp_reference == "pretrained"

    @classmethod
    def validate(cls, cfg) -> None:
        o, a, t = cfg.algorithm.options, cfg.algorithm, cfg.train
        if not o.kl_coef > 0:
            raise ConfigError(
                f"algorithm.kl_coef must be > 0 for prdp, got {o.kl_coef}: it is PRDP's beta, the reward "
                "difference is divided by it; set e.g. algorithm.kl_coef=3e-5 (the paper's small scale)"
            )
        if o.prdp_reference not in REFERENCES:
            raise ConfigError(
                f"algorithm.prdp_reference must be one of {list(REFERENCES)}, got {o.prdp_reference!r}"
            )
        if a.group_size < 2:
            raise ConfigError(
                f"algorithm.group_size must be >= 2 for prdp, got {a.group_size}: it regresses reward "
                "differences of pairs of samples of one prompt; set e.g. algorithm.group_size=16 (PRDP)"
            )
        if t.minibatch_unit != "trajectory":
            raise ConfigError(
                "prdp trains on whole chains of whole prompt groups: set train.minibatch_unit=trajectory"
            )
        if t.minibatch_size % a.group_size:
            raise ConfigError(
                f"train.minibatch_size ({t.minibatch_size}) must be a multiple of algorithm.group_size "
                f"({a.group_size}) for prdp: its pairs are within a prompt group, so a minibatch holds "
                f"whole groups; set train.minibatch_size to a multiple of {a.group_size}"
            )

    @property
    def steps(self) -> str:
        return "all"

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        stochastic = torch.isfinite(chain.log_probs)
        if not stochastic.any(1).all():
            raise ConfigError(
                "the sampler produced no stochastic step to train on (check sampler.eta / noise_level / sde_window)"
            )
        if self.options.prdp_reference == "sampling":
            chain.metadata["prdp_ref_log_probs"] = chain.log_probs
            return
        # log pi_ref of every recorded stochastic step, once per epoch, in chunks of minibatch rows
        ref = torch.full_like(chain.log_probs, float("nan"))
        b_all, k_all = torch.nonzero(stochastic.cpu(), as_tuple=True)
        size = self.cfg.train.minibatch_size * chain.num_steps
        with torch.no_grad():
            for i in range(0, len(b_all), size):
                b, k = b_all[i : i + size], k_all[i : i + size]
                out = self.sampler.log_prob(self.adapter, chain, k, traj_index=b, reference=True)
                ref[b.to(ref.device), k.to(ref.device)] = out.log_prob.float()
        chain.metadata["prdp_ref_log_probs"] = ref

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        device = chain.latents.device
        M, S = mb.steps.shape
        b, k = mb.rows.repeat_interleave(S), mb.steps.reshape(-1)  # (M S,) each, CPU
        b_dev, k_dev = b.to(device, non_blocking=True), k.to(device, non_blocking=True)
        new = self.sampler.log_prob(self.adapter, chain, k, traj_index=b).log_prob.view(M, S)
        old = chain.log_probs[b_dev, k_dev].view(M, S)
        ref = chain.metadata["prdp_ref_log_probs"][b_dev, k_dev].view(M, S)
        lr, lr_old = new - ref, old - ref  # the per-step log-ratios l_bk, l_bk^old
        eps = self.algo.clip_range
        lr_clip = lr if eps is None else torch.minimum(torch.maximum(lr, lr_old - eps), lr_old + eps)
        rows = mb.rows.to(device, non_blocking=True)
        loss, unclipped, pairs = pair_losses(
            lr.mean(1),
            lr_clip.mean(1),
            chain.rewards[rows].float(),
            chain.metadata["group"][rows],
            self.options.kl_coef,
        )
        log_ratio = (new - old).detach()
        return {
            "loss": loss,
            "loss_unclipped": unclipped,
            "pairs": pairs,
            "clipfrac": ((log_ratio.abs() > eps).float().mean() if eps is not None else torch.zeros(())),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
