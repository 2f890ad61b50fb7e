"""RAFT: reward-ranked fine-tuning (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative
Foundation Model Alignment", arXiv 2304.06767): sample G images per prompt, keep the best, and
train the model's own denoising loss on them (supervised fine-tuning on its filtered samples).

    M  rows of the minibatch   G  samples per prompt draw (algorithm.group_size)   N  num_loss_samples

At the start of the epoch each group's ``raft_keep`` highest-reward trajectories are kept (ties:
the first). A minibatch's loss is the denoising loss of its kept rows' final samples x0, at N
fresh (step, noise) pairs each (k uniform over the sampler's steps):

    loss = sum_rows keep_b * mean_n l_theta(x0_b, k_bn, eps_bn) / max(1, sum_rows keep_b)

where l is the sampler's ``denoising_loss`` with the network's own target (``target="model"``:
eps, v or x0, as it was trained). No likelihood, no advantage: any sampler with a denoising loss
(DDIM, flow, DDPM) works, its deterministic (eta 0 / ODE) versions included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core import seeding
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class RAFTOptions:
    # trajectories kept per prompt group, the highest rewards (RAFT: the best 1 of K)
    raft_keep: int = 1
    # (step, noise) draws of the denoising loss per kept sample and minibatch
    num_loss_samples: int = 1


def top_in_groups(rewards: Tensor, groups: Tensor, keep: int) -> Tensor:
    """(B,) bool: the ``keep`` highest rewards of each group (ties: the earlier index); groups are
    any integer labels, of any sizes, in any order."""
    order = torch.argsort(-rewards.double(), stable=True)  # best first, ties by index
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then as above
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # where each group's run begins in ``order``
    place = torch.arange(len(order), device=order.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(order)
    rank[order] = place  # each trajectory's place in its group, best first
    return rank < keep


class RAFT(Objective):
    """Reward-ranked filtered fine-tuning (see the module docstring)."""

    Options = RAFTOptions
    needs_log_probs = False

    @classmethod
    def validate(cls, cfg) -> None:
        o, a = cfg.algorithm.options, cfg.algorithm
        if not 1 <= o.raft_keep < a.group_size:
            raise ConfigError(
                f"algorithm.raft_keep must be in [1, group_size - 1] = [1, {a.group_size - 1}], got {o.raft_keep}: "
                "RAFT keeps the best of each group of algorithm.group_size samples; raise algorithm.group_size "
                "(RAFT: e.g. 4) or lower algorithm.raft_keep"
            )
        if o.num_loss_samples < 1:
            raise ConfigError(f"algorithm.num_loss_samples must be >= 1, got {o.num_loss_samples}")
        if cfg.sampler.name in ("lcm", "reinflow"):
            raise ConfigError(
                f"RAFT trains the model's denoising loss, which sampler {cfg.sampler.name!r} does not define; "
                "use a ddim or flow sampler"
            )

    @property
    def steps(self) -> str:
        return "none"

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        chain.metadata["raft_keep"] = top_in_groups(
            chain.rewards.cpu(), chain.metadata["group"].cpu(), self.options.raft_keep
        ).to(chain.latents.device)

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        device = chain.latents.device
        rows = mb.rows.to(device, non_blocking=True)
        keep = chain.metadata["raft_keep"][rows].float()  # (M,)
        x0 = chain.latents[rows, -1]
        cond = {n: v[rows] for n, v in chain.cond.items()}
        M, N, K = len(rows), self.options.num_loss_samples, self.sampler.num_steps
        losses = []
        for _ in range(N):
            k = torch.randint(0, K, (M,), generator=generator)  # CPU, like every step index
            noise = seeding.randn(tuple(x0.shape), generator, device)
            losses.append(
                self.sampler.denoising_loss(
                    self.adapter,
                    x0,
                    cond,
                    k,
                    noise,
                    1.0,
                    target="model",  # the conditional network, as it was trained
                )
            )
        per_row = torch.stack(losses, 1).mean(1)  # (M,)
        loss = (per_row * keep).sum() / keep.sum().clamp(min=1.0)
        return {
            "loss": loss,
            "loss_denoising": loss.detach(),
            "kept_fraction": keep.mean().detach(),
            "kept_reward_mean": (chain.rewards[rows] * keep).sum().detach() / keep.sum().clamp(min=1.0),
        }
