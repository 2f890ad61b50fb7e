"""Objectives: what an update minimizes, one file each, plug-ins of the one update loop.

    ppo   the PPO family on per-step log-probs: DDPO, GRPO, LOOP, REINFORCE, DPPO, ReinFlow
    fpo   Flow Policy Optimization (FPO, FPO++): a ratio from the flow-matching loss, no likelihood needed
    reward_backprop  the reward's gradient through the last steps of the chain: DRaFT-K, DRaFT-LV, AlignProp, ReFL
    prdp  proximal reward difference prediction: pairs' chain log-ratio differences regressed on their reward's
    raft  reward-ranked filtered fine-tuning: the denoising loss on each prompt's best samples
    dpo   Diffusion-DPO: preference pairs from a file (train.pairs), denoising losses against the reference's
    d3po  D3PO / online DPO: pairs of the current chain ranked by the reward or human labels, per-step log-ratios
    nft   DiffusionNFT: negative-aware fine-tuning on the forward process of a flow model, no likelihood
    find  FIND: a policy over the initial noise x_T of the frozen denoiser, one ratio per sample
    sac   soft actor-critic from a replay buffer, trained between env steps: DSRL-SAC

A *method* is the name a user picks (``algorithm.name``): an objective with a default advantage
estimator and its paper's defaults, written under the task file's own values. Adding an
objective is one file (a subclass of :class:`~flowrl.objectives.base.Objective`) plus an entry in
:data:`OBJECTIVES`; a method is an entry in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# objective name -> "module:Class", imported on demand
OBJECTIVES = {
    "ppo": "flowrl.objectives.ppo:PPO",
    "fpo": "flowrl.objectives.fpo:FPO",
    "reward_backprop": "flowrl.objectives.reward_backprop:RewardBackprop",
    "raft": "flowrl.objectives.raft:RAFT",
    "prdp": "flowrl.objectives.prdp:PRDP",
    "dpo": "flowrl.objectives.dpo:DiffusionDPO",
    "d3po": "flowrl.objectives.d3po:D3PO",
    "nft": "flowrl.objectives.nft:NFT",
    "find": "flowrl.objectives.find:FIND",
    "sac": "flowrl.objectives.sac:SAC",
}


@dataclass(frozen=True)
class Method:
    """A named method: an objective, its default advantage estimator, and its paper's defaults."""

    objective: str
    # the advantage estimator (None: the collector's default)
    advantage: str | None
    # the collectors (task kinds) it is defined for
    kinds: tuple[str, ...]
    # section -> {key: value}: defaults under the task file's own values
    defaults: dict = field(default_factory=dict)
    # section -> {key: value}: what the method is, over the task file's values (REINFORCE never clips,
    # so switching a PPO task to it with algorithm.name=reinforce means what the name says)
    fixed: dict = field(default_factory=dict)
    # the paper, for the docs and the task files' comments
    cite: str = ""

    def objective_class(self):
        return objective_class(self.objective)


METHODS: dict[str, Method] = {
    "ddpo": Method("ppo", "per_prompt", ("text_to_image",), cite="Black et al. 2023, arXiv 2305.13301"),
    "grpo": Method("ppo", "group", ("text_to_image",), cite="Shao et al. 2024; Flow-GRPO, Liu et al. 2025"),
    "loop": Method(
        "ppo", "leave_one_out", ("text_to_image",), cite="Gupta et al. 2025 (RLOO: Kool et al. 2019)"
    ),
    "reinforce": Method(
        "ppo",
        "batch_mean",
        ("text_to_image",),
        fixed={"algorithm": {"clip_range": None}},
        cite="Williams 1992",
    ),
    "mixgrpo": Method(
        "ppo",
        "group",
        ("text_to_image",),
        {  # MixGRPO's finetune_flux_grpo_MixGRPO.sh: a 4-step SDE window moving 1 step every 25 iterations
            "sampler": {
                "sde_window": 4,
                "window_schedule": "progressive",
                "window_shift_interval": 25,
                "group_same_noise": True,  # init_same_noise
            },
            "algorithm": {"clip_range": 1e-4, "timestep_fraction": 1.0},
        },
        cite="Li et al. 2025, arXiv 2507.21802",
    ),
    "dppo": Method(
        "ppo",
        "gae",
        ("env",),
        {"algorithm": {"ratio_scope": "step"}, "train": {"minibatch_unit": "pair"}},
        cite="Ren et al. 2024, arXiv 2409.00588",
    ),
    "reinflow": Method(
        "ppo",
        "gae",
        ("env",),
        {
            "algorithm": {
                "ratio_scope": "chain",
                "chain_logprob": "reinflow",
                "chain_logprob_clip": [-1.0, 1.0],
            }
        },
        cite="Zhang et al. 2025, arXiv 2505.22094",
    ),
    "pirl_flow_sde": Method(
        "ppo",
        "gae",
        ("env",),
        {
            "sampler": {"name": "flow_sde", "noise_level": 0.5, "sde_window": 1},
            "algorithm": {"ratio_scope": "step"},
        },
        cite="pi-RL Flow-SDE: Chen et al. 2025, arXiv 2510.25889",
    ),
    "pirl_flow_noise": Method(
        "ppo",
        "gae",
        ("env",),
        {
            "sampler": {"name": "flow_noise", "noise_min_std": 0.08, "noise_max_std": 0.16},
            "algorithm": {"ratio_scope": "chain", "chain_logprob": "reinflow"},
        },
        cite="pi-RL Flow-Noise: Chen et al. 2025, arXiv 2510.25889",
    ),
    # Gaussian heads on the PPO objective (flowrl/models/gaussian_policy.py, flowrl/samplers/gaussian.py)
    "gaussian_ppo": Method(
        "ppo",
        "gae",
        ("env",),
        {  # DPPO's PPO_Gaussian: mean log-prob over the chunk clamped to [-5, 2], randn_clip_value 3
            "algorithm": {"ratio_scope": "step", "clip_range": 0.01},
            "sampler": {"logprob_reduction": "mean", "noise_clip": 3.0, "logprob_clip": [-5.0, 2.0]},
        },
        fixed={"model": {"family": "gaussian_policy"}, "sampler": {"name": "gaussian"}},
        cite="DPPO's Gaussian baseline: Ren et al. 2024, arXiv 2409.00588",
    ),
    "residual_ppo": Method(
        "ppo",
        "gae",
        ("env",),
        {  # ResiP: clip_coef 0.2, target_kl 0.1; log-prob summed, no clamps; init_logstd -1.5
            "algorithm": {"ratio_scope": "step", "clip_range": 0.2, "target_kl": 0.1},
            "sampler": {"logprob_reduction": "sum", "noise_clip": None, "logprob_clip": None},
            "model": {"gaussian_std_init": 0.22313, "gaussian_std_min": 1e-3, "gaussian_std_max": 1.0},
        },
        fixed={"model": {"family": "residual_policy"}, "sampler": {"name": "gaussian"}},
        cite="ResiP: Ankile et al. 2024, arXiv 2407.16677",
    ),
    "dsrl_ppo": Method(
        "ppo",
        "gae",
        ("env",),
        {  # DSRL: the noise action b tanh(u), b = 1.5; a Gaussian policy's summed log-prob
            "algorithm": {"ratio_scope": "step", "clip_range": 0.2},
            "sampler": {"logprob_reduction": "sum", "noise_clip": None, "logprob_clip": None},
            "model": {"gaussian_std_init": 0.5, "gaussian_std_min": 0.01, "gaussian_std_max": 1.0},
        },
        fixed={"model": {"family": "dsrl_policy"}, "sampler": {"name": "gaussian"}},
        cite="DSRL: Wagenmaker et al. 2025, arXiv 2506.15799",
    ),
    "dsrl_sac": Method(
        "sac",
        "none",  # off-policy: its own twin Q from a replay buffer (flowrl/objectives/sac.py)
        ("env",),
        {  # DSRL gym: SAC's squashed actor and Q nets of 3 x 128 (layer_size, num_layers), lr 3e-4
            "model": {"dsrl_head": "squashed", "head_hidden_dims": [128, 128, 128]},
            "sampler": {"logprob_reduction": "sum", "noise_clip": None, "logprob_clip": None},
            "optim": {"learning_rate": 3e-4},
        },
        fixed={"model": {"family": "dsrl_policy"}, "sampler": {"name": "gaussian"}},
        cite="DSRL: Wagenmaker et al. 2025, arXiv 2506.15799",
    ),
    "fpo": Method(
        "fpo",
        None,
        ("text_to_image", "env"),
        {"algorithm": {"clip_range": 0.05}},
        cite="McAllister et al. 2025, arXiv 2507.21053",
    ),
    "draft": Method(
        "reward_backprop",
        "none",
        ("text_to_image",),
        {"algorithm": {"backprop_steps": 1}},
        fixed={"algorithm": {"mode": "draft"}},
        cite="DRaFT-K: Clark et al. 2024, arXiv 2309.17400",
    ),
    "alignprop": Method(
        "reward_backprop",
        "none",
        ("text_to_image",),
        {"algorithm": {"reward_scale": 0.01}},  # AlignProp's loss_coeff
        fixed={"algorithm": {"mode": "alignprop"}},
        cite="Prabhudesai et al. 2023, arXiv 2310.03739",
    ),
    "refl": Method(
        "reward_backprop",
        "none",
        ("text_to_image",),
        fixed={"algorithm": {"mode": "refl"}},
        cite="ReFL (ImageReward): Xu et al. 2023, arXiv 2304.05977",
    ),
    "draft-lv": Method(
        "reward_backprop",
        "none",
        ("text_to_image",),
        {"algorithm": {"lv_samples": 2}},  # DRaFT-LV's n
        fixed={"algorithm": {"mode": "draft_lv"}},
        cite="DRaFT-LV: Clark et al. 2024, arXiv 2309.17400",
    ),
    "prdp": Method(
        "prdp",
        "none",  # the raw rewards' differences
        ("text_to_image",),
        # the paper's small-scale column: 16 images per prompt, beta 3e-5, stepwise clip 1e-6
        {"algorithm": {"group_size": 16, "kl_coef": 3e-5, "clip_range": 1e-6}},
        cite="Deng et al. 2024, arXiv 2402.08714",
    ),
    "raft": Method(
        "raft",
        "none",
        ("text_to_image",),
        {"algorithm": {"group_size": 4}},
        cite="Dong et al. 2023, arXiv 2304.06767",
    ),
    "find": Method(
        "find",
        "leave_one_out",  # FIND's learned reward baseline: here the mean of the prompt's other samples
        ("text_to_image",),
        {"algorithm": {"clip_range": 0.2, "group_size": 4}, "model": {"noise_policy": "free"}},
        fixed={"model": {"finetune": "frozen"}},
        cite="Chen et al. 2024, arXiv 2407.19453",
    ),
    "diffusion_nft": Method(
        "nft",
        "group",  # the reference: each prompt's mean, the whole batch's std (+1e-4)
        ("text_to_image",),
        {"algorithm": {"std_scope": "batch", "group_size": 24}},
        cite="Zheng et al. 2025, arXiv 2509.16117",
    ),
    "dpo": Method(
        "dpo",
        "none",
        ("text_to_image",),
        {"algorithm": {"beta_dpo": 5000.0}},
        cite="Diffusion-DPO: Wallace et al. 2023, arXiv 2311.12908",
    ),
    "d3po": Method(
        "d3po",
        "none",
        ("text_to_image",),
        {
            "algorithm": {"group_size": 2, "d3po_beta": 0.1, "d3po_eps": 0.1},
            "sampler": {"group_same_noise": True},
        },
        cite="D3PO: Yang et al. 2024, arXiv 2311.13231",
    ),
    "fpo++": Method(
        "fpo",
        None,
        ("text_to_image", "env"),
        {"algorithm": {"clip_range": 0.05, "fpo_ratio": "per_sample", "trust_region": "aspo"}},
        cite="Yi, Choi et al. 2026, Flow Policy Gradients for Robot Control",
    ),
}


def objective_class(name: str):
    """The Objective subclass registered under ``name`` (its module imported on demand)."""
    module, _, cls = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_objective(cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
    """The objective of ``cfg.algorithm.name``, bound to the run's model, sampler, value function
    and (for objectives that differentiate it) reward."""
    return cfg.method.objective_class()(cfg, adapter, sampler, value, demonstrations, reward)


__all__ = ["METHODS", "OBJECTIVES", "Method", "build_objective", "objective_class"]
