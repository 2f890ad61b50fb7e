"""D3PO: online DPO on the denoising chain (Yang et al. 2024, "Using Human Feedback to Fine-tune
Diffusion Models without Any Reward Model", arXiv 2311.13231; reference:
github.com/yk7333/d3po, scripts/rm/train_d3po.py).

    P  pairs   S  trained steps per pair   w, l  the preferred and the other chain of a pair

Each epoch's chains come in groups of G samples of one prompt (``algorithm.group_size``; D3PO: 2).
(``sampler.group_same_noise``, the method's default, starts a group from one initial noise, as the
reference's pair.) Within a group, samples 0 and 1, 2 and 3, ... form pairs; the preferred one is the one with the
higher reward (ties: no preference, not trained), or the one a human-labels file names
(``d3po_labels``, below). Every step k of a pair is one DPO term on the recorded transition's
log-probs, current (theta) and reference (the model with LoRA disabled, or a frozen copy):

    rho_k(x)  = clip(log p_theta(x_{k+1} | x_k, c) - log p_ref(x_{k+1} | x_k, c), log(1 - eps), log(1 + eps))
    loss      = mean_{pairs, steps} -log sigmoid(beta * (rho_k(w) - rho_k(l)))

the reference's ``ratio = clamp(exp(logp - logp_ref), 1 - eps, 1 + eps)`` inside ``beta * log(ratio)``
(identical values and gradients: zero outside the clip). At the start p_theta = p_ref, so
every term is log 2. Both chains of a pair train on the same steps (the reference's one
permutation per pair): a pair trains in the minibatch its preferred chain falls in, on that
chain's sampled steps (``timestep_fraction`` of them, D3PO: 1.0). Log-probs reduce over the
latent as the sampler's ``logprob_reduction`` says (mean: the reference's DDPO step).

Human labels (``d3po_labels``): a JSONL file, one preference per line,
``{"epoch": 0, "chosen": 4, "rejected": 5}``: in epoch ``epoch`` (0-based, as checkpoints count
from 1), trajectory ``chosen`` is preferred to ``rejected``; indices are positions in that
epoch's chains on the process (0 .. sample_batch_size x num_batches_per_epoch - 1, batch after
batch, the order the run samples them in; the run is deterministic in (seed, epoch), so a
labeller can render the same images first). Both must be of one group; pairs not named are
not trained. No reward model is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.chain import Chain
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class D3POOptions:
    # the DPO temperature beta on per-step log-ratios (D3PO: train.beta 0.1)
    d3po_beta: float = 0.1
    # clip of each step's ratio p_theta / p_ref to [1 - eps, 1 + eps] (D3PO: train.eps 0.1); null = no clip
    d3po_eps: float | None = 0.1
    # preferences: null = ranked by the reward within each pair; or a JSONL file of human labels
    # ({"epoch", "chosen", "rejected"} per line, see flowrl.objectives.d3po)
    d3po_labels: str | None = None
    # fraction of the chain's steps each pair trains on (D3PO: timestep_fraction 1.0)
    timestep_fraction: float = 1.0


def load_labels(path: str | Path) -> dict[int, list[tuple[int, int]]]:
    """epoch -> [(chosen, rejected)] from a labels file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"algorithm.d3po_labels: no file {path}; give a JSONL file of preferences or null")
    out: dict[int, list[tuple[int, int]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            e, w, lo = (row[k] for k in ("epoch", "chosen", "rejected"))
            if not all(isinstance(v, int) and v >= 0 for v in (e, w, lo)) or w == lo:
                raise ValueError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"algorithm.d3po_labels: {path} line {n} is not a preference; write "
                '{"epoch": 0, "chosen": 4, "rejected": 5} (non-negative integers, two different trajectories)'
            ) from err
        out.setdefault(e, []).append((w, lo))
    return out


def pairs_by_reward(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(partner (B,) long, preference (B,): +1 the preferred one of its pair, -1 the other, 0 a tie
    or unpaired): samples 0-1, 2-3, ... of each group (in index order) are pairs."""
    B = len(rewards)
    partner = torch.arange(B)
    pref = torch.zeros(B)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(i)
    for rows in members.values():
        for a, b in zip(rows[0::2], rows[1::2]):
            partner[a], partner[b] = b, a
            if rewards[a] > rewards[b]:
                pref[a], pref[b] = 1.0, -1.0
            elif rewards[b] > rewards[a]:
                pref[a], pref[b] = -1.0, 1.0
    return partner, pref


def d3po_loss(
    logp_w: Tensor, ref_w: Tensor, logp_l: Tensor, ref_l: Tensor, beta: float, eps: float | None
) -> tuple[Tensor, Tensor]:
    """(loss, the clipped fraction) over (P, S) per-step log-probs of the pairs' two chains."""
    rho_w, rho_l = logp_w - ref_w, logp_l - ref_l
    clipped = torch.zeros(())
    if eps is not None:
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        clipped = ((rho_w < lo) | (rho_w > hi) | (rho_l < lo) | (rho_l > hi)).float().mean()
        rho_w, rho_l = rho_w.clamp(lo, hi), rho_l.clamp(lo, hi)
    return -F.logsigmoid(beta * (rho_w - rho_l)).mean(), clipped


class D3PO(Objective):
    """Online DPO on the chain's per-step log-probs (see the module docstring)."""

    Options = D3POOptions
    needs_log_probs = True

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        return True  # the per-step log-ratios' log pi_ref, always

    @classmethod
    def validate(cls, cfg) -> None:
        o, a = cfg.algorithm.options, cfg.algorithm
        if a.group_size < 2 or a.group_size % 2:
            raise ConfigError(
                f"algorithm.group_size must be even and >= 2 for D3PO, got {a.group_size}: pairs are two samples "
                "of one prompt; set algorithm.group_size=2 (D3PO)"
            )
        if not o.d3po_beta > 0:
            raise ConfigError(f"algorithm.d3po_beta must be > 0, got {o.d3po_beta}; D3PO uses 0.1")
        if o.d3po_eps is not None and not 0 < o.d3po_eps < 1:
            raise ConfigError(
                f"algorithm.d3po_eps must be in (0, 1) or null, got {o.d3po_eps}; D3PO uses 0.1"
            )
        if not 0 < o.timestep_fraction <= 1:
            raise ConfigError(f"algorithm.timestep_fraction must be in (0, 1], got {o.timestep_fraction}")
        if o.d3po_labels is not None:
            load_labels(o.d3po_labels)
        if cfg.train.minibatch_unit != "trajectory":
            raise ConfigError("D3PO trains pairs of whole chains: set train.minibatch_unit=trajectory")

    def __init__(self, cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
        super().__init__(cfg, adapter, sampler, value, demonstrations, reward)
        o = self.options
        self.labels = load_labels(o.d3po_labels) if o.d3po_labels is not None else None

    @property
    def steps(self) -> str:
        return "sampled"

    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        groups = chain.metadata["group"].cpu()
        if self.labels is None:
            partner, pref = pairs_by_reward(chain.rewards.cpu(), groups)
        else:
            B = len(chain)
            partner, pref = torch.arange(B), torch.zeros(B)
            for w, lo in self.labels.get(epoch, []):
                if max(w, lo) >= B or groups[w] != groups[lo]:
                    raise ConfigError(
                        f"algorithm.d3po_labels: epoch {epoch} pairs trajectories {w} and {lo}, which are "
                        + (
                            "not in the epoch's " + str(B)
                            if max(w, lo) >= B
                            else "not samples of one prompt group"
                        )
                        + "; label two samples of one group"
                    )
                partner[w], partner[lo], pref[w], pref[lo] = lo, w, 1.0, -1.0
        chain.metadata["d3po_partner"], chain.metadata["d3po_pref"] = partner, pref

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o = self.options
        pref = chain.metadata["d3po_pref"]
        anchor = pref[mb.rows] > 0  # the pairs whose preferred chain is in this minibatch
        weight = 1.0
        if not bool(anchor.any()):  # none here: one zero-weighted term keeps the graph (and DDP) whole
            anchor[0], weight = True, 0.0
        w = mb.rows[anchor]
        lo = chain.metadata["d3po_partner"][w]
        steps = mb.steps[anchor]  # (P, S) the preferred chain's steps, for both chains
        P, S = steps.shape
        traj = torch.cat([w.repeat_interleave(S), lo.repeat_interleave(S)])
        k = torch.cat([steps.flatten(), steps.flatten()])
        logp = self.sampler.log_prob(self.adapter, chain, k, traj).log_prob.view(2, P, S)
        with torch.no_grad():
            ref = self.sampler.log_prob(self.adapter, chain, k, traj, reference=True).log_prob.view(2, P, S)
        loss, clipped = d3po_loss(logp[0], ref[0], logp[1], ref[1], o.d3po_beta, o.d3po_eps)
        margin = ((logp[0] - ref[0]) - (logp[1] - ref[1])).detach()
        return {
            "loss": loss * weight,
            "loss_d3po": loss.detach() * weight,
            "implicit_acc": (margin > 0).float().mean() * weight,
            "d3po_margin": o.d3po_beta * margin.mean() * weight,
            "clipfrac": clipped.detach() * weight,
            "pair_fraction": anchor.float().mean() * weight,
        }
