"""The per-step policy-gradient loss for a Gaussian denoising chain.

    B  trajectories in the minibatch, one denoising step each.

The whole objective is :func:`policy_loss` (read it top to bottom). For each trajectory b at
denoising step k, with advantage A_b shared by all its steps:

    ratio     = exp(log pi_theta(x_{k+1} | x_k, c) - log pi_old(x_{k+1} | x_k, c))
    PPO-clip  : loss_pg = mean_b max(-A_b * ratio, -A_b * clip(ratio, 1 - eps, 1 + eps))
                (Schulman et al. 2017, eq. 7; DDPO, Black et al. 2023, eq. 4)
    REINFORCE : loss_pg = mean_b -A_b * ratio     (gradient -A grad log pi at ratio = 1)
    KL        : loss_kl = beta * mean_b KL(pi_theta || pi_ref), closed form for two Gaussians
                with the same std sigma:  ||mu_theta - mu_ref||^2 / (2 sigma^2)
    entropy   : loss_entropy = -c_ent * mean_b H(pi_theta), for a learned std (ReinFlow's bonus);
                a Gaussian's entropy is log sigma + 1/2 log(2 pi e) per dimension
"""

from __future__ import annotations

import torch
from torch import Tensor


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float | None,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> dict[str, Tensor]:
    """PPO-clip (``clip_range`` > 0) or REINFORCE (``clip_range`` None) on (B,) per-step log-probs.

    Returns the named terms: ``loss`` (what to backpropagate), ``loss_pg``, ``loss_kl`` and the
    diagnostics ``approx_kl`` (the low-variance estimator 1/2 E[(log ratio)^2]), ``clipfrac``,
    ``ratio_mean``, ``ratio_max``, ``ratio_min`` (detached). With an ``entropy`` (B,) it also
    returns ``loss_entropy`` = -ent_coef * mean entropy (included in ``loss``) and ``entropy``.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    if clip_range is None:
        loss_pg = (-advantages * ratio).mean()
        clipfrac = torch.zeros((), device=ratio.device)
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss_pg = torch.maximum(unclipped, clipped).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    loss_kl = kl_coef * kl.mean() if kl is not None else torch.zeros((), device=ratio.device)
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": clipfrac,
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
            "ratio_min": ratio.min(),
            "kl_ref": kl.mean() if kl is not None else torch.zeros((), device=ratio.device),
        }
    terms = {"loss": loss_pg + loss_kl, "loss_pg": loss_pg, "loss_kl": loss_kl, **info}
    if entropy is not None:
        terms["loss_entropy"] = -ent_coef * entropy.mean()
        terms["loss"] = terms["loss"] + terms["loss_entropy"]
        terms["entropy"] = entropy.mean().detach()
    return terms
