"""What every objective shares: the minibatch it is given, and the optional terms of the family.

    B  trajectories of the epoch   M  rows of a minibatch   S  chain steps per row   K  chain steps

An objective is a plug-in of the update loop (:mod:`flowrl.train`). It declares what it needs
from collection (``needs_log_probs``: per-step log-probs recorded by a stochastic sampler, or only
the final samples; ``steps``: which chain steps a minibatch carries) and returns named loss terms:
``loss`` (what is backpropagated) plus ``loss_*`` parts and detached diagnostics. Its own options
are a dataclass, ``Options``, whose fields are keys of the task's ``algorithm`` section.

The optional terms of the family, shared by every objective here:

    advantage normalization   A <- (A - mean_mb A) / (std_mb A + 1e-8)       (algorithm.normalize_advantages)
    value loss                loss_value = 1/2 mean_mb (V(s) - R)^2, weight vf_coef   (GAE advantages; with
                              the step critic, over every denoising step of the rows: flowrl.core.step_critic)
    behavior cloning          loss_bc = the model's own denoising loss on demonstrations, weight bc_coef
                              (DPPO's optional BC regularization)
    critic warmup             the first critic_warmup_epochs train the value function alone
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain


@dataclass
class Minibatch:
    """One forward's share of an optimizer step.

    Attributes:
        rows: (M,) trajectory indices into the epoch's Chain, on the CPU (repeats allowed).
        steps: (M, S) the recorded chain steps each row trains on, on the CPU (S = 0 when the
            objective needs no steps).
        weight: this forward's loss is multiplied by it before backward: its share of the
            optimizer step's mean.
    """

    rows: Tensor
    steps: Tensor
    weight: float = 1.0


@dataclass
class NoOptions:
    """An objective without options of its own."""


class Objective:
    """The base of every objective (see the module docstring).

    Args:
        cfg: the validated :class:`~flowrl.config.TaskConfig`.
        adapter: the model being trained.
        sampler: the run's :class:`~flowrl.samplers.base.ChainSampler`.
        value: the value network (GAE advantages) or None.
        demonstrations: normalized ``(obs (N, To, Do), actions (N, Ta, Da))`` for the BC term, or None.
        reward: the task's :class:`~flowrl.rewards.Reward` (objectives that backpropagate it), or None.
    """

    Options: type = NoOptions
    needs_log_probs: bool = True

    def __init__(self, cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
        self.cfg, self.algo = cfg, cfg.algorithm
        self.options = cfg.algorithm.options
        self.adapter, self.sampler, self.value = adapter, sampler, value
        self.demonstrations, self.reward = demonstrations, reward

    @classmethod
    def validate(cls, cfg) -> None:
        """Config-time checks of the objective's options (raise ConfigError naming the key)."""

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        """Whether the run keeps the reference policy (a frozen copy of the initial denoiser under
        ``model.finetune=full``; LoRA's is the adapter disabled) because this objective, with
        ``cfg``'s options, calls it (``reference=True``). By default it does not."""
        return False

    @property
    def steps(self) -> str:
        """Which chain steps a minibatch row carries: ``sampled`` (a random subset of the stochastic
        steps, ``timestep_fraction`` of them), ``all`` (every step, in order) or ``none``."""
        return "none"

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        """Once per epoch, before the update passes (the parameters are still the sampling ones)."""

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def sampling(self, epoch: int, global_step: int):
        """The context the run shell collects the epoch's samples in: by default the trained
        weights; an objective that samples with another policy (DiffusionNFT's old one) swaps it in."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the objective a checkpoint holds for an exact resume (DiffusionNFT's old policy)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------------ the optional terms
    def trains_policy(self, epoch: int) -> bool:
        """False during critic warmup: the value function trains alone."""
        return epoch >= self.algo.critic_warmup_epochs

    def minibatch_advantages(self, chain: Chain, rows: Tensor) -> Tensor:
        """(M,) the rows' advantages, normalized within the minibatch when the task says so."""
        adv = chain.advantages[rows]
        if self.algo.normalize_advantages and len(rows) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return adv

    def pair_advantages(self, chain: Chain, mb: Minibatch, adv: Tensor) -> Tensor:
        """(M * S,) the advantage of each (row, step) pair of the minibatch: its row's, ``adv`` (M,),
        repeated over its S steps; with per-step advantages (``advantage: step_critic``,
        ``metadata["step_advantages"]`` (B, K)) the pair's own, normalized over the pairs when the
        task says so."""
        step = chain.metadata.get("step_advantages")
        if step is None:
            return adv.repeat_interleave(mb.steps.shape[1])
        out = step[mb.rows.to(step.device)[:, None], mb.steps.to(step.device)].reshape(-1)
        if self.algo.normalize_advantages and out.numel() > 1:
            out = (out - out.mean()) / (out.std() + 1e-8)
        return out

    def add_bc(self, terms: dict[str, Tensor], generator: torch.Generator) -> None:
        """loss += bc_coef * the model's denoising loss on a random batch of demonstrations."""
        if self.algo.bc_coef <= 0:
            return
        obs, actions = self.demonstrations
        i = torch.randint(0, len(actions), (self.algo.bc_batch_size,), generator=generator).to(actions.device)
        terms["loss_bc"] = self.adapter.bc_loss(obs[i], actions[i])
        terms["loss"] = terms["loss"] + self.algo.bc_coef * terms["loss_bc"]

    def with_value(self, terms: dict[str, Tensor], chain: Chain, rows: Tensor) -> dict[str, Tensor]:
        """Add the value loss of the rows' observations against their returns (GAE), or, for a
        critic over denoising steps, of every step's state of the rows (``returns`` (B, K))."""
        if self.value is None:
            return terms
        if getattr(self.value, "per_step", False):
            v = self.value.chain_values(chain, rows)  # (M, K)
        else:
            v = self.value(chain.cond["obs"][rows])
        loss_v = 0.5 * ((v - chain.metadata["returns"][rows]) ** 2).mean()
        loss = self.algo.vf_coef * loss_v + (terms["loss"] if terms else 0.0)
        return {**terms, "loss": loss, "loss_value": loss_v.detach()}
