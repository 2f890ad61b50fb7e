"""One task schema for every run: nested dataclasses, loaded from YAML with ``key=value`` overrides.

A task file picks a collector (``kind``: ``text_to_image`` or ``env``), a model family, a sampler,
a method (``algorithm.name``) and hyper-parameters. The shared settings (run, optimizer, update
loop) have one name for both kinds; a section only one kind uses (``rewards`` for text-to-image,
``env`` / ``demos`` / ``pretrain`` / ``clip_reward`` for environments) is refused in the other.

Defaults come in layers, lowest first: the dataclass defaults below (text-to-image's, DDPO's),
the collector's (``env`` tasks get DPPO's and ReinFlow's, :data:`flowrl.collectors.env.DEFAULTS`),
the method's (:data:`flowrl.objectives.METHODS`), then the task file, then the overrides; last,
what a method fixes (REINFORCE's null clip range). The written ``config.yaml`` of a run holds the
result, every key resolved.

Every field has a one-line comment (it is also the ``--help`` of the CLI options derived from
it); unknown keys are refused with a suggestion (renamed ones with their new name), types are
checked, and :meth:`TaskConfig.validate` names the field and the fix for bad values before any
model is loaded. Choice lists come from the registries (collectors, families, samplers,
methods, advantage estimators), not from lists beside them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowrl.core.schedule import LR_SCHEDULES
from flowrl.errors import ConfigError, read_text, suggest

__all__ = ["ConfigError", "TaskConfig", "load_config", "config_to_dict", "field_docs"]


@dataclass
class ModelConfig:
    # text_to_image: a diffusers pipeline (hub id, or a local folder with model_index.json), "tiny" (random,
    # from config) or "digits" (the demo's); env: the pre-trained policy folder (null: where `flowrl pretrain` writes)
    pretrained: str | None = "tiny"
    # auto (a pipeline's model_index.json, a policy's policy.json) | sd | sdxl | sd3 | lcm | flux | diffusion_policy | flow_policy
    family: str = "auto"
    # hub revision (branch, tag or commit) when `pretrained` is a hub id
    revision: str | None = None
    # override the scheduler's prediction type: epsilon | v_prediction | sample (null: as the pipeline says)
    prediction_type: str | None = None
    # lora (peft adapter, the reference policy is the adapter disabled) or full fine-tuning (policies: full)
    finetune: str = "lora"
    # text_to_image: a trainable policy over the initial noise x_T in front of the frozen denoiser (FIND,
    # algorithm.name=find): free (a mean and std of the latent's shape, FIND's code) | conditional (an MLP on
    # the prompt embedding) | null (x_T ~ N(0, I))
    noise_policy: str | None = None
    # LoRA rank r
    lora_rank: int = 4
    # LoRA alpha (scale alpha / r); null means alpha = r
    lora_alpha: float | None = None
    # text_to_image, sd family: the text encoder trains too (TexForce): frozen | lora (on CLIP's q/k/v/out_proj) |
    # full; with model.finetune=frozen it trains alone. The update re-encodes the prompts' token ids with gradient
    text_encoder_finetune: str = "frozen"
    # LoRA rank of the text encoder (TexForce: 16); null: model.lora_rank
    text_encoder_lora_rank: int | None = None
    # LoRA alpha of the text encoder (TexForce: 16); null: its rank
    text_encoder_lora_alpha: float | None = None
    # text_to_image: [height, width] in pixels (one int: a square) the model trains, evaluates and samples at
    # (Flow-GRPO: 512); null: the model's own, a checkpoint's default (1024 for SD3.5 and FLUX.1) or, for
    # pretrained=tiny, tiny_image_size. Multiples of the VAE scale x patch size (SD, SDXL: 8; SD3, Flux: 16)
    resolution: int | list[int] | None = None
    # image size of the tiny pipeline, pixels (latents are half): the size it is built at; model.resolution,
    # when set, is the size it samples at
    tiny_image_size: int = 32
    # seed used to initialize the tiny pipeline's random weights
    tiny_seed: int = 0
    # policy families: Ta, actions per predicted chunk (>= env.action_steps; DPPO/ReinFlow gym: 4)
    action_horizon: int = 4
    # policy families: widths of the denoiser MLP's hidden layers (DPPO/ReinFlow gym: [512, 512, 512])
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    # policy families: width of the sinusoidal time embedding (DPPO/ReinFlow: 16)
    time_dim: int = 16
    # diffusion_policy: T, the DDPM steps of pre-training (DPPO: 20)
    num_train_steps: int = 20
    # flow_policy: a shortcut model (Frans et al. 2024; ReinFlow's ShortCutFlow): the velocity also reads the step
    # size d, BC adds self-consistency targets, ReinFlow runs its K steps at d = 1/K (K a power of two)
    shortcut: bool = False
    # shortcut: L, the self-consistency d grid 1, 1/2, ..., 2^-(L-1) (ReinFlow's max_denoising_steps M gives M - 1: 19)
    shortcut_levels: int = 19
    # shortcut: the share of each BC batch given self-consistency targets (ReinFlow's self_consistency_k 0.25)
    shortcut_sc_fraction: float = 0.25
    # shortcut: delta of x_t = (1 - (1 - delta) t) x_0 + t x_1 and the target x_1 - (1 - delta) x_0 (ReinFlow: 1e-5)
    shortcut_delta: float = 1e-5
    # hidden widths of the value network of GAE advantages (DPPO/ReinFlow: [256, 256, 256])
    value_hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    # gaussian_policy / residual_policy / dsrl_policy: the Gaussian head's learned, state-independent std at
    # the start (DPPO's Gaussian: fixed_std 0.1; ResiP: exp(-1.5), init_logstd; the DSRL task: 0.5)
    gaussian_std_init: float = 0.1
    # Gaussian head: the lower bound of its std, clamped where it is used (DPPO's std_min 0.01)
    gaussian_std_min: float = 0.01
    # Gaussian head: the upper bound of its std (DPPO's std_max 0.2)
    gaussian_std_max: float = 0.2
    # gaussian_policy: tanh on the mean, so it stays in the normalized action range (DPPO's tanh_output)
    gaussian_tanh_mean: bool = True
    # residual_policy / dsrl_policy: the family of the frozen policy the head steers (what flowrl pretrain
    # clones): diffusion_policy | flow_policy
    base_family: str = "flow_policy"
    # residual_policy / dsrl_policy: hidden widths of the head's MLP (ResiP: [256, 256]; DSRL gym: 3 x 128)
    head_hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    # residual_policy: alpha, env action = base + alpha * residual, normalized units (ResiP's action_scale 0.1)
    residual_scale: float = 0.1
    # residual_policy: the frozen chain's initial noise: sampled (N(0, I), as the base policy runs) | zero
    base_noise: str = "sampled"
    # dsrl_policy: b, the noise action w = b tanh(u) lies in [-b, b] (DSRL's action_magnitude 1.5)
    dsrl_noise_bound: float = 1.5
    # dsrl_policy: the noise policy's head: gaussian (a learned, state-independent std; DSRL-PPO) | squashed
    # (SAC's actor as DSRL runs it: mean and log std from a LayerNorm-tanh trunk; dsrl_sac's default)
    dsrl_head: str = field(default="gaussian", metadata={"choices": ("gaussian", "squashed")})


@dataclass
class SamplerConfig:
    # ddim (SD/SDXL, DDPO) | flow_sde (SD3/Flux, Flow-GRPO) | flow_cps (coefficient-preserving) | lcm (RLCM) |
    # ddpm (diffusion policies, DPPO) | reinflow (flow policies, learned noise) | euler (flow policies, ODE);
    # null: the model family's first
    name: str | None = None
    # K, denoising steps per training sample (ReinFlow: flow steps per chunk)
    num_steps: int = 20
    # denoising steps for evaluation images (null: num_steps); Flow-GRPO trains on fewer steps than it evaluates
    eval_num_steps: int | None = None
    # DDIM eta during training samples (0 would be deterministic and have no log-prob)
    eta: float = 1.0
    # flow samplers' noise level a (null: Flow-GRPO's 0.7 for flow_sde, 0.8 for flow_cps; 0 = the ODE)
    noise_level: float | None = None
    # flow samplers: 0 = every step stochastic; w > 0 = a window of w SDE steps per batch (Flow-GRPO-Fast), only those trained
    sde_window: int = 0
    # flow samplers: latest start of the SDE window (null: num_steps // 2 - sde_window, Flow-GRPO-Fast's window
    # in the first half of the chain)
    window_max_start: int | None = None
    # flow samplers: where the SDE window lies: random (Flow-GRPO-Fast: its start drawn per batch) | progressive
    # (MixGRPO: a sliding window that moves by window_stride every window_shift_interval epochs, then rolls back)
    window_schedule: str = "random"
    # progressive window: epochs it stays in place (MixGRPO's iters_per_group: 25)
    window_shift_interval: int = 25
    # progressive window: steps it moves by (MixGRPO's prog_overlap_step: 1; 0 = fixed at the first steps)
    window_stride: int = 1
    # flow samplers: the ODE steps after the SDE window: euler | dpmpp2m (MixGRPO-Flash: DPM-Solver++ 2M midpoint)
    ode_solver: str = "euler"
    # flow samplers, dpmpp2m with a progressive window: fraction of the levels after the window kept (MixGRPO-Flash's
    # dpm_post_compress_ratio 0.4; 1 = the full schedule)
    ode_compress: float = 1.0
    # text_to_image: the group_size samples of a prompt draw start from one initial noise, so they differ by
    # the SDE steps' noise alone (MixGRPO's init_same_noise)
    group_same_noise: bool = False
    # classifier-free guidance scale, used for sampling and for re-evaluating log-probs (1 = off)
    guidance_scale: float = 5.0
    # how per-step log-probs reduce over the sample's dims: mean (DDPO, Flow-GRPO; clip range per dimension) or sum
    logprob_reduction: str = "mean"
    # ddpm: K, the last DDPM steps fine-tuned (DPPO: 10 of 20); ddim on a diffusion policy (DPPO's DDIM): the
    # last K of the num_steps DDIM steps (DPPO: all 5)
    ft_steps: int = 10
    # ddpm: floor on every step's std while fine-tuning (DPPO: 0.1)
    min_std: float = 0.1
    # reinflow: lower bound of the noise network's std (ReinFlow hopper: 0.10)
    noise_min_std: float = 0.1
    # reinflow: upper bound of the noise network's std (ReinFlow hopper: 0.24)
    noise_max_std: float = 0.24
    # reinflow: hidden widths of the noise network (ReinFlow: [64, 64])
    noise_hidden_dims: list[int] = field(default_factory=lambda: [64, 64])
    # euler: the fixed std of every step's noise (0 = the plain ODE, exploration from x_0 alone; FPO's sde_sigma)
    noise_std: float = 0.0
    # flow_cps: log-prob as Flow-GRPO's code, -(x' - mean)^2 (flow_grpo), or the Gaussian log-density (normalized)
    cps_logprob: str = "flow_grpo"
    # ddpm: clip of x0_hat (DPPO's denoised_clip_value); reinflow: clip of each step's mean and the final
    # action (ReinFlow's denoised_clip_value, act range); actions are normalized to [-1, 1]; null = none
    denoised_clip: float | None = 1.0
    # ddpm, reinflow: clip of the drawn N(0, I) sampling noise (DPPO's and ReinFlow's randn_clip_value 3); null = none
    noise_clip: float | None = 3.0
    # ddpm: clamp of each element's log-density before the mean over the chunk (DPPO: [-5, 2]); null = exact
    logprob_clip: list[float] | None = field(default_factory=lambda: [-5.0, 2.0])
    # ddpm, ddim on a diffusion policy: the log-prob covers the chunk's first h actions (DPPO's reward_horizon,
    # the executed env.action_steps); null = the whole chunk
    logprob_horizon: int | None = None
    # ddpm: evaluation chain: posterior (DPPO: DDPM std floored at 1e-3, the last step noiseless) | mean (mean path)
    eval_noise: str = "posterior"
    # lcm: the last step: renoise (RLCM: re-noised to t_{K-1}'s own level, its log-prob trained; the image is
    # f(x_t)) | deterministic (f(x_t), log-prob NaN, not trained: the image never depends on that noise)
    lcm_last_step: str = "renoise"
    # lcm: timesteps: rlcm (RLCM's set_timesteps, as diffusers 0.23) | diffusers (the installed diffusers')
    lcm_schedule: str = "rlcm"


@dataclass
class RewardConfig:
    # a registered reward name (jpeg_compressibility, aesthetic, clip_score, ...) or a path file.py[:function]
    name: str = "jpeg_compressibility"
    # weight of this term in the summed reward
    weight: float = 1.0
    # keyword options passed to the reward's factory
    kwargs: dict = field(default_factory=dict)


@dataclass
class EnvConfig:
    # gymnasium id (MuJoCo: InvertedPendulum-v5, Reacher-v5, InvertedDoublePendulum-v5, Hopper-v5, ...)
    id: str = "InvertedPendulum-v5"
    # keyword arguments for gymnasium.make
    kwargs: dict = field(default_factory=dict)
    # episode cap in env steps (null: the env's own)
    max_episode_steps: int | None = None
    # To, the observation history the policy conditions on (DPPO and ReinFlow gym: 1)
    obs_horizon: int = 1
    # Te, actions of each chunk executed before the policy is queried again (DPPO gym: 4)
    action_steps: int = 4
    # an evaluation episode with at least this return is a success, for envs that report no success of their
    # own (info["is_success"] / info["success"], which is used where present); null: no success rate then
    success_return: float | None = None
    # parallel environments in rollouts, per process (DPPO/ReinFlow gym: 40)
    num_envs: int = 8
    # chunk steps per environment per epoch; envs reset at every epoch, so make n_steps x
    # action_steps at least one episode (DPPO/ReinFlow gym: 500 x 4)
    n_steps: int = 250
    # evaluation episodes, deterministic sampling, reset seeds train.eval_seed, +1, ... (>= 10 for a stated result)
    eval_episodes: int = 10
    # render one evaluation episode to <run>/videos/epoch_N.gif at every evaluation (needs a MuJoCo renderer)
    video: bool = False
    # how the num_envs envs step: sync (in this process) | async (a subprocess each, gymnasium's
    # AsyncVectorEnv: the same results, faster when a step costs more than its pipe, e.g. rendering)
    vectorization: str = field(default="sync", metadata={"choices": ("sync", "async")})
    # running observation normalization (gymnasium's NormalizeObservation, CleanRL's PPO-MuJoCo recipe):
    # training rollouts update the policy's observation statistics, evaluation reads them frozen (PPO from scratch)
    normalize_obs: bool = False


@dataclass
class ClipRewardConfig:
    # add a CLIP reward on rendered frames (VLM-RM); needs a MuJoCo renderer (MUJOCO_GL=egl headless)
    enabled: bool = False
    # OpenCLIP architecture ("ViT-B-32", ...) or "flowrl-tiny" (random, for tests)
    model: str = "ViT-B-32"
    # OpenCLIP weights tag or local file; null = random weights
    pretrained: str | None = "openai"
    # the goal the frame should match, e.g. "a pole balanced upright on a cart"
    goal_prompt: str = ""
    # baseline prompt whose direction is projected out (VLM-RM); empty = none
    baseline_prompt: str = ""
    # VLM-RM's alpha: 0 = plain cosine similarity, 1 = full projection onto goal - baseline
    alpha: float = 0.5
    # weight of the CLIP term added to the env reward (the env reward keeps weight env_weight)
    weight: float = 1.0
    # weight of the environment's own reward
    env_weight: float = 1.0
    # rendered frame size in pixels
    render_size: int = 224
    # where CLIP runs: cpu | cuda | auto (cuda when available)
    device: str = "auto"


@dataclass
class DemoConfig:
    # demonstrations file; null: generate them with `expert` into the pre-training folder
    path: str | None = None
    # npz (flowrl's format) | d4rl | robomimic | minari (HDF5, needs h5py); see flowrl.data.demos
    format: str = "npz"
    # robomimic: observation keys to concatenate (null: all, sorted)
    obs_keys: list | None = None
    # scripted expert that generates demonstrations when `path` is null: lqr | reacher_ik_pd | policy (a
    # trained flowrl policy folder, expert_kwargs.path; see flowrl.data.policy_expert)
    expert: str | None = None
    # the expert's options (gains, weakening, noise_std), see flowrl.data.experts
    expert_kwargs: dict = field(default_factory=dict)
    # episodes to generate
    num_episodes: int = 50
    # seed of the first generated episode (then +1 per episode) and of the expert's noise
    seed: int = 1000


@dataclass
class PretrainConfig:
    # folder of the BC policy (null: <train.output_dir>/<task name>_bc); fine-tuning starts from it
    output_dir: str | None = None
    # optimizer steps of behavior cloning
    steps: int = 3000
    # windows per BC minibatch
    batch_size: int = 256
    # AdamW learning rate
    learning_rate: float = 1e-3
    # AdamW weight decay
    weight_decay: float = 1e-6
    # log the BC loss every this many steps
    log_every: int = 100
    # evaluation episodes of the BC policy at the end (null: env.eval_episodes, the same fixed seeds
    # as fine-tuning's evaluations, so the numbers compare; 0: no evaluation)
    eval_episodes: int | None = None


@dataclass
class AlgorithmConfig:
    # the method: ddpo | grpo | loop | reinforce | mixgrpo | draft | draft-lv | alignprop | refl | raft | prdp | dpo |
    # d3po | find | diffusion_nft (text_to_image) | dppo | reinflow (env) | fpo | fpo++ (both);
    # each is an objective with its paper's defaults (flowrl.objectives.METHODS). The objective's own
    # options are keys of this section too (e.g. ratio_scope and kl_coef for the PPO family)
    name: str = "ddpo"
    # advantage estimator (null: the method's): per_prompt (DDPO) | group (GRPO) | leave_one_out (LOOP) |
    # batch_mean | none (REINFORCE) | gae (with a value function; env) | step_critic (text_to_image, PPO
    # family: per denoising step, GAE with a learned critic V(x_k, t_k, c) on the shaped final reward; AC-Flow style)
    advantage: str | None = None
    # step_critic: the estimator that shapes the final reward the critic learns (per_prompt | group |
    # leave_one_out | batch_mean | none); with a zero critic and gamma = gae_lambda = 1 every step gets it
    step_critic_shaping: str = "group"
    # PPO clip range on the ratios (DDPO: 1e-4 with mean-reduced log-probs; DPPO/ReinFlow gym: 0.01); null = no clipping
    clip_range: float | None = 1e-4
    # text_to_image: advantages are clipped to [-adv_clip_max, adv_clip_max]
    adv_clip_max: float = 5.0
    # samples per prompt in each batch (group and leave_one_out advantages need >= 2)
    group_size: int = 1
    # group advantages: divide by the group's std, the batch's std, or none
    std_scope: str = "group"
    # group advantages: leave the trajectories of groups whose rewards are all equal out of the update
    # (Flow-GRPO: its minibatches shrink, their number stays); false: they stay, with advantage 0 (they
    # then dilute each minibatch's mean and still feel the KL term)
    drop_zero_std: bool = False
    # per_prompt advantages: rewards kept per prompt for its statistics
    stat_buffer_size: int = 16
    # per_prompt advantages: rewards a prompt needs before its own statistics are used (else batch statistics)
    stat_min_count: int = 16
    # gae: discount per chunk step (DPPO/ReinFlow gym: 0.99); step_critic: per denoising step
    gamma: float = 0.99
    # gae / step_critic: GAE lambda (DPPO/ReinFlow gym: 0.95)
    gae_lambda: float = 0.95
    # gae: divide rewards by the running std of the discounted return (DPPO/ReinFlow: reward_scale_running)
    reward_scaling: bool = True
    # gae / step_critic: value loss weight (DPPO/ReinFlow: 0.5)
    vf_coef: float = 0.5
    # gae: first epochs that train only the value function
    critic_warmup_epochs: int = 0
    # normalize advantages within each minibatch (DPPO/ReinFlow/FPO do; text-to-image advantages are normalized when estimated)
    normalize_advantages: bool = False
    # stop an epoch's updates once the approximate KL of a minibatch exceeds this (DPPO/ReinFlow: 1.0; null: never)
    target_kl: float | None = None
    # weight of a behavior-cloning loss on the demonstrations added to every policy update (env;
    # DPPO's optional BC regularization; 0 = off)
    bc_coef: float = 0.0
    # demonstration windows per BC-regularization minibatch
    bc_batch_size: int = 256
    # the chosen objective's own options, parsed into its Options dataclass (written flat in the section)
    options: typing.Any = field(default=None, metadata={"hidden": True})


@dataclass
class OptimConfig:
    # AdamW learning rate of the policy (DPPO hopper: 1e-4; ReinFlow hopper: 4.5e-5)
    learning_rate: float = 3e-4
    # AdamW learning rate of the value network, when there is one (DPPO hopper: 1e-3; ReinFlow hopper: 6.5e-4)
    value_learning_rate: float = 1e-3
    # AdamW beta1
    beta1: float = 0.9
    # AdamW beta2
    beta2: float = 0.999
    # AdamW weight decay
    weight_decay: float = 1e-4
    # AdamW epsilon
    eps: float = 1e-8
    # gradient-norm clip, applied to the policy's and the value network's parameters separately
    max_grad_norm: float = 1.0
    # minibatches accumulated per optimizer step
    gradient_accumulation_steps: int = 1
    # learning rate after warmup: constant | linear | cosine (both decay to lr_final_ratio x the base
    # rate at the run's last schedule step)
    lr_schedule: str = "constant"
    # what one schedule step is: step (an optimizer step; diffusers' trainers) | epoch (DPPO and ReinFlow
    # step their schedulers once per iteration); null: step for text_to_image, epoch for env
    lr_schedule_unit: str | None = None
    # schedule steps of linear warmup from the base rate / lr_warmup up to the base rate (0 = none)
    lr_warmup: int = 0
    # linear / cosine: the learning rate of the last schedule step, as a fraction of the base rate
    lr_final_ratio: float = 0.0


@dataclass
class TrainConfig:
    # name of the run, its folder under output_dir (null: the task file's name)
    run_name: str | None = None
    # where run folders are written
    output_dir: str = "runs"
    # global seed: sampling noise, prompt draws, env resets, shuffling all derive from (seed, epoch, rank)
    seed: int = 0
    # training epochs (each: collect, advantages, update)
    num_epochs: int = 20
    # passes over each epoch's data (DDPO: num_inner_epochs 1; DPPO/ReinFlow gym: update_epochs 5)
    update_epochs: int = 1
    # what one minibatch holds, in minibatch_unit, per process
    minibatch_size: int = 8
    # trajectory: whole trajectories with their trained steps (DDPO, ReinFlow); pair: (trajectory, denoising
    # step) pairs shuffled across trajectories (DPPO)
    minibatch_unit: str = "trajectory"
    # denoising steps per training forward: each forward carries minibatch_size x this many
    # (trajectory, step) pairs, with the same gradient for any value. 1 = one step per forward as
    # DDPO / trl do (least activation memory: the default, safe for full-size models);
    # 0 = all trained steps of a minibatch in one forward (fastest for small models and CPUs)
    timestep_batch: int = 1
    # text_to_image: samples per sampling batch, per process
    sample_batch_size: int = 8
    # text_to_image: sampling batches per epoch, per process
    num_batches_per_epoch: int = 2
    # text_to_image: prompts: a list, a named set (see flowrl.data.prompts), a text file with one prompt per line,
    # a JSONL file (one {"prompt": ..., metadata fields} per line; the metadata reaches every reward), or a
    # folder with splits as Flow-GRPO's datasets (train_metadata.jsonl / train.txt; this reads the train split)
    prompts: typing.Any = "simple_animals"
    # text_to_image: a JSONL file of preference pairs (prompt, chosen and rejected image paths, see
    # flowrl.data.pairs); each epoch then takes sample_batch_size x num_batches_per_epoch pairs from it
    # instead of sampling (Diffusion-DPO, algorithm.name=dpo); null: sample
    pairs: str | None = None
    # text_to_image: prompts rendered into the evaluation image grid (deterministic sampler, fixed seed):
    # any train.prompts source (a folder gives its test split), "test" (the test split of the train.prompts
    # folder), or null (the first 8 training prompts)
    eval_prompts: typing.Any = None
    # text_to_image: evaluation prompts sampled and scored per batch (null: all in one batch), so that a test split
    # of thousands fits (Flow-GRPO's test_batch_size); the grid shows the first 64
    eval_batch_size: int | None = None
    # text_to_image: score rewards in a background thread while the next batch samples
    async_reward: bool = True
    # evaluate every this many epochs, and before and after training (0 = only before and after)
    eval_every: int = 5
    # seed of the evaluation noise and env resets, the same at every evaluation (null: train.seed + 12345)
    eval_seed: int | None = None
    # write a checkpoint every this many epochs (0 = only at the end)
    save_every: int = 5
    # keep at most this many checkpoints (oldest deleted)
    keep_checkpoints: int = 3
    # resume from a checkpoint folder, or "auto" for the latest complete one in the run folder
    resume: str | None = None
    # resume even though the config differs from the checkpoint's in keys that break exactness (seed,
    # learning rate, ...; the CLI's --allow-config-change); false: such a resume is refused, listing the keys
    resume_allow_changes: bool = False
    # no | fp16 | bf16 (through accelerate)
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16")})
    # null | tensorboard | wandb (through accelerate), besides the JSONL metrics always written
    log_with: str | None = None
    # text_to_image with train.log_with: this many of each epoch's samples go to the tracker with "prompt |
    # reward" captions (ddpo-pytorch's); 0: numbers only
    log_images: int = 4
    # a non-finite sample, reward, advantage, log-prob, loss or gradient: stop (naming the epoch, step and
    # inputs) or skip (no update from that batch or epoch; counted as skipped_updates)
    on_nonfinite: str = "stop"
    # keep an exponential moving average of the trained weights (used for evaluation and saving)
    ema: bool = False
    # EMA decay per optimizer step
    ema_decay: float = 0.99
    # recompute activations in the backward pass (less memory, more time)
    gradient_checkpointing: bool = False
    # torch.compile the denoiser in place, static shapes (sampling, training and the LoRA-disabled
    # reference each get their graph; names and checkpoints are unchanged). The first epoch pays
    # the compile: ~110 s for the tiny CPU model, which then samples 1.2x and trains 1.09x faster
    # (LoRA, CFG; full fine-tuning 1.00x). For long runs; bench/bench_train_step.py --compile
    compile: bool = False
    # auto (CUDA when there is one) | cpu | cuda
    device: str = "auto"
    # torch threads of the run (null: torch's default; 1 is fastest for small policy networks)
    torch_threads: int | None = None
    # skip the memory check made before any weights load (flowrl.memory: an order-of-magnitude estimate of the
    # peak from the sizes; a run estimated above 4x the device's available memory is refused, above 1x warned)
    skip_memory_check: bool = False


@dataclass
class TaskConfig:
    # the collector: text_to_image (prompts -> samples -> rewards) | env (vector envs -> action chunks -> GAE)
    kind: str = "text_to_image"
    # one-line description of the task
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    # how the weighted reward terms combine: sum | mean | wco (worst case: their minimum) | uwo (their mean minus
    # reward_uwo_coef x their variance); wco and uwo treat the rewards as an ensemble of reward models (Coste et al. 2024)
    reward_combine: str = "sum"
    # lambda of reward_combine: uwo
    reward_uwo_coef: float = 1.0
    # seconds one batch's reward scoring may take before the run stops with an error naming the reward
    # (a reward that hangs; null: no limit)
    reward_timeout: float | None = 1800.0
    env: EnvConfig = field(default_factory=EnvConfig)
    clip_reward: ClipRewardConfig = field(default_factory=ClipRewardConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ------------------------------------------------------------------ derived
    @property
    def method(self):
        """The :class:`~flowrl.objectives.Method` ``algorithm.name`` names."""
        from flowrl.objectives import METHODS

        return METHODS[self.algorithm.name]

    @property
    def advantage(self) -> str:
        """The advantage estimator: ``algorithm.advantage``, else the method's, else the collector's."""
        from flowrl.collectors import collector_class

        return self.algorithm.advantage or self.method.advantage or collector_class(self.kind).ADVANTAGES[0]

    @property
    def eval_seed(self) -> int:
        return self.train.seed + 12345 if self.train.eval_seed is None else self.train.eval_seed

    @property
    def lr_schedule_unit(self) -> str:
        return self.optim.lr_schedule_unit or ("epoch" if self.kind == "env" else "step")

    def bc_dir(self, task_name: str) -> Path:
        """Where ``flowrl pretrain`` writes the BC policy and fine-tuning reads it."""
        if self.pretrain.output_dir is not None:
            return Path(self.pretrain.output_dir)
        return Path(self.train.output_dir) / f"{task_name}_bc"

    # ------------------------------------------------------------------ validation
    def validate(self) -> TaskConfig:
        """Check values that are well-typed but wrong; raise ConfigError naming field and fix. The
        shared settings here, then the collector's, the sampler's and the objective's own checks."""
        from flowrl.collectors import COLLECTORS, collector_class
        from flowrl.objectives import METHODS
        from flowrl.rewards.registry import Reward

        a, t, o, m = self.algorithm, self.train, self.optim, self.model
        *first, last = Reward.COMBINE
        need(
            self.reward_combine in Reward.COMBINE,
            f"reward_combine: unknown {self.reward_combine!r}; choose {', '.join(first)} or {last}",
        )
        need(
            self.reward_combine not in ("wco", "uwo") or len(self.rewards) >= 2,
            f"reward_combine={self.reward_combine} combines an ensemble of reward models, but rewards has "
            f"{len(self.rewards)}; list at least 2 rewards or set reward_combine=sum",
        )
        need(
            self.kind in COLLECTORS,
            f"kind: unknown task kind {self.kind!r}{_suggest(self.kind, COLLECTORS)}; choose one of {list(COLLECTORS)}",
        )
        need(
            a.name in METHODS,
            f"algorithm.name: unknown algorithm {a.name!r}{_suggest(a.name, METHODS)}; choose one of {list(METHODS)}",
        )
        method = METHODS[a.name]
        need(
            self.kind in method.kinds,
            f"algorithm.name={a.name!r} is a method for kind: {' or '.join(method.kinds)} tasks, and this task "
            f"is kind: {self.kind}; use one of "
            f"{[n for n, mm in METHODS.items() if self.kind in mm.kinds]}",
        )
        collector = collector_class(self.kind)
        need(
            self.advantage in collector.ADVANTAGES,
            f"algorithm.advantage: {self.advantage!r} does not fit kind: {self.kind} tasks; choose one of "
            f"{list(collector.ADVANTAGES)}",
        )
        need(
            m.text_encoder_finetune in ("frozen", "lora", "full"),
            f"model.text_encoder_finetune: unknown mode {m.text_encoder_finetune!r}"
            f"{_suggest(m.text_encoder_finetune, ('frozen', 'lora', 'full'))}; set frozen, lora (TexForce) or full",
        )
        need(
            m.noise_policy in (None, "free", "conditional"),
            f"model.noise_policy: unknown policy {m.noise_policy!r}; set free, conditional or null",
        )
        need(
            (m.noise_policy is not None) == (a.name == "find"),
            "model.noise_policy (a policy over the initial noise) is what algorithm.name=find trains, and only it; "
            + (
                "set model.noise_policy=free or conditional"
                if a.name == "find"
                else "set model.noise_policy=null, or algorithm.name=find"
            ),
        )
        trains_text = m.text_encoder_finetune != "frozen"
        need(
            m.finetune in ("lora", "full")
            or (m.finetune == "frozen" and (m.noise_policy is not None or trains_text)),
            f"model.finetune: unknown mode {m.finetune!r}{_suggest(m.finetune, ('lora', 'full'))}; "
            "set model.finetune=lora (an adapter) or model.finetune=full (all weights)"
            + (
                "; frozen (the denoiser does not train) needs something else that does, e.g. "
                "model.text_encoder_finetune=lora"
                if m.finetune == "frozen"
                else ""
            ),
        )
        need(
            not trains_text or (self.kind == "text_to_image" and m.noise_policy is None),
            f"model.text_encoder_finetune={m.text_encoder_finetune} trains a text-to-image model's text encoder"
            + (
                ", but model.noise_policy trains only the initial noise of a frozen model"
                if m.noise_policy is not None
                else f", and this task is kind: {self.kind}"
            )
            + "; set model.text_encoder_finetune=frozen",
        )
        te_rank = m.lora_rank if m.text_encoder_lora_rank is None else m.text_encoder_lora_rank
        need(
            m.text_encoder_finetune != "lora" or te_rank >= 1,
            f"model.text_encoder_lora_rank (null: model.lora_rank) must be >= 1 for LoRA, got {te_rank}; set e.g. "
            "model.text_encoder_lora_rank=16 (TexForce), or model.text_encoder_finetune=full",
        )
        need(
            m.text_encoder_lora_alpha is None or m.text_encoder_lora_alpha > 0,
            f"model.text_encoder_lora_alpha must be > 0 or null, got {m.text_encoder_lora_alpha}; "
            "set model.text_encoder_lora_alpha=null for alpha = rank",
        )
        need(
            m.finetune != "lora" or m.lora_rank >= 1,
            f"model.lora_rank must be >= 1, got {m.lora_rank}: a rank-0 adapter has no weights to train; "
            "set model.lora_rank=4 (or more), or model.finetune=full to train all weights",
        )
        need(
            m.lora_alpha is None or m.lora_alpha > 0,
            f"model.lora_alpha must be > 0 or null, got {m.lora_alpha}; set model.lora_alpha=null for alpha = rank",
        )
        need(
            m.tiny_image_size % 8 == 0 and 8 <= m.tiny_image_size <= 512,
            f"model.tiny_image_size must be a multiple of 8 in [8, 512], got {m.tiny_image_size}: the tiny model's "
            "activations grow with its square (65536 would need terabytes); set e.g. model.tiny_image_size=32",
        )
        sides = [m.resolution] if isinstance(m.resolution, int) else m.resolution or []
        need(
            m.resolution is None or (len(sides) in (1, 2) and all(1 <= s <= 8192 for s in sides)),
            f"model.resolution must be a size in pixels, one int (a square) or [height, width] in [1, 8192], "
            f"got {m.resolution}; e.g. model.resolution=512 (Flow-GRPO's) or model.resolution=[512, 768]",
        )
        need(
            m.pretrained != "tiny" or max(sides, default=0) <= 512,
            f"model.resolution={m.resolution}: the tiny model's activations grow with the square of its size; "
            "set at most 512 px a side, e.g. model.resolution=64",
        )
        for key in ("hidden_dims", "value_hidden_dims"):
            need(
                all(isinstance(h, int) and 1 <= h <= 65536 for h in getattr(m, key)),
                f"model.{key} must be widths in [1, 65536], got {getattr(m, key)}; e.g. model.{key}=[256, 256]",
            )
        # optimizer
        need(
            0 < o.learning_rate < float("inf") and 0 < o.value_learning_rate < float("inf"),
            f"optim.learning_rate and optim.value_learning_rate must be > 0, got {o.learning_rate} and "
            f"{o.value_learning_rate}, and finite: the optimizer would not descend (or make every weight NaN); "
            "set e.g. optim.learning_rate=3e-4",
        )
        need(
            0 < self.pretrain.learning_rate < float("inf"),
            f"pretrain.learning_rate must be > 0 and finite, got {self.pretrain.learning_rate}; "
            "set e.g. pretrain.learning_rate=1e-3",
        )
        need(
            o.max_grad_norm > 0,
            f"optim.max_grad_norm must be > 0, got {o.max_grad_norm}; set e.g. optim.max_grad_norm=1.0",
        )
        need(
            0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
            f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}; "
            "AdamW's defaults are optim.beta1=0.9 and optim.beta2=0.999",
        )
        need(
            o.gradient_accumulation_steps >= 1,
            f"optim.gradient_accumulation_steps must be >= 1, got {o.gradient_accumulation_steps}; "
            "set 1 for one optimizer step per minibatch",
        )
        need(
            o.lr_schedule_unit in (None, "step", "epoch"),
            f"optim.lr_schedule_unit must be step, epoch or null, got {o.lr_schedule_unit!r}",
        )
        problem = lr_schedule_problem(o.lr_schedule, o.lr_warmup, o.lr_final_ratio)
        need(problem is None, problem or "")
        # the shared algorithm knobs
        need(
            a.clip_range is None or a.clip_range > 0,
            f"algorithm.clip_range must be > 0 or null, got {a.clip_range}: a clip range <= 0 leaves no "
            "trust region; set e.g. "
            + (
                "algorithm.clip_range=0.01 (DPPO / ReinFlow gym)"
                if self.kind == "env"
                else "algorithm.clip_range=1e-4"
            )
            + ", or null for no clipping",
        )
        need(
            a.adv_clip_max > 0,
            f"algorithm.adv_clip_max must be > 0, got {a.adv_clip_max}: it would zero every advantage; "
            "set e.g. algorithm.adv_clip_max=5",
        )
        need(
            a.std_scope in ("group", "batch", "none"),
            f"algorithm.std_scope: unknown scope {a.std_scope!r}; set algorithm.std_scope=group, batch or none",
        )
        need(
            not a.drop_zero_std or self.advantage == "group",
            f"algorithm.drop_zero_std drops the groups of group advantages, but the advantage here is "
            f"{self.advantage!r}; set algorithm.advantage=group or algorithm.drop_zero_std=false",
        )
        need(
            a.group_size >= 1,
            f"algorithm.group_size must be >= 1, got {a.group_size}; set 1 for one sample per prompt",
        )
        need(
            a.stat_buffer_size >= 1 and a.stat_min_count >= 1,
            f"algorithm.stat_buffer_size and stat_min_count must be >= 1, got {a.stat_buffer_size}, "
            f"{a.stat_min_count}; DDPO uses 16 and 16",
        )
        if self.advantage == "step_critic":
            shapings = ("per_prompt", "group", "leave_one_out", "batch_mean", "none")
            need(
                a.step_critic_shaping in shapings,
                f"algorithm.step_critic_shaping: unknown estimator {a.step_critic_shaping!r}; choose one of "
                f"{list(shapings)}",
            )
            o = a.options
            need(
                self.method.objective == "ppo" and getattr(o, "ratio_scope", "step") == "step",
                f"algorithm.advantage=step_critic gives each denoising step its own advantage, which only the "
                f"PPO family's per-step ratios use (algorithm.name={a.name!r}"
                + (", ratio_scope=chain" if self.method.objective == "ppo" else "")
                + "); use algorithm.name=grpo or ddpo with ratio_scope=step, or another algorithm.advantage",
            )
        if self.advantage in ("group", "leave_one_out") or (
            self.advantage == "step_critic" and a.step_critic_shaping in ("group", "leave_one_out")
        ):
            need(
                a.group_size >= 2,
                f"algorithm.group_size must be >= 2 for {a.name}, got {a.group_size}: its {self.advantage} "
                "advantages are relative within a group of samples of one prompt; set e.g. algorithm.group_size=4",
            )
        need(0 < a.gamma <= 1, f"algorithm.gamma must be in (0, 1], got {a.gamma}")
        need(0 <= a.gae_lambda <= 1, f"algorithm.gae_lambda must be in [0, 1], got {a.gae_lambda}")
        need(a.vf_coef >= 0, f"algorithm.vf_coef must be >= 0, got {a.vf_coef}")
        need(
            a.critic_warmup_epochs >= 0,
            f"algorithm.critic_warmup_epochs must be >= 0, got {a.critic_warmup_epochs}",
        )
        need(a.bc_coef >= 0, f"algorithm.bc_coef must be >= 0, got {a.bc_coef}")
        need(a.bc_batch_size >= 1, f"algorithm.bc_batch_size must be >= 1, got {a.bc_batch_size}")
        need(
            a.target_kl is None or a.target_kl > 0,
            f"algorithm.target_kl must be > 0 or null, got {a.target_kl}",
        )
        # the run and the update loop
        for key in ("num_epochs", "update_epochs", "minibatch_size"):
            need(
                getattr(t, key) >= 1,
                f"train.{key} must be >= 1, got {getattr(t, key)}; set a positive count, e.g. train.{key}=4",
            )
        need(
            t.minibatch_unit in ("trajectory", "pair"),
            f"train.minibatch_unit must be trajectory or pair, got {t.minibatch_unit!r}",
        )
        for key in ("eval_every", "save_every", "keep_checkpoints"):
            need(
                getattr(t, key) >= 0, f"train.{key} must be >= 0, got {getattr(t, key)}; set 0 to turn it off"
            )
        need(
            t.run_name is None
            or (t.run_name.strip() not in ("", ".", "..") and not any(c in t.run_name for c in "/\\\0")),
            f"train.run_name {t.run_name!r} must be a plain folder name (no '/', '\\', '..' or empty): the run "
            "folder is train.output_dir/train.run_name; set train.output_dir for another place",
        )
        need(
            self.reward_timeout is None or 0 < self.reward_timeout < float("inf"),
            f"reward_timeout must be a positive number of seconds or null (no limit), got {self.reward_timeout}; "
            "e.g. reward_timeout=600",
        )
        need(
            t.mixed_precision in ("no", "fp16", "bf16"),
            f"train.mixed_precision: unknown precision {t.mixed_precision!r}; set no, fp16 or bf16",
        )
        need(
            t.log_with in (None, "tensorboard", "wandb"),
            f"train.log_with: unknown tracker {t.log_with!r}; set null, tensorboard or wandb",
        )
        need(
            0 <= t.log_images <= 64,
            f"train.log_images must be in [0, 64] images per epoch, got {t.log_images}; e.g. train.log_images=4",
        )
        need(
            t.timestep_batch >= 0,
            f"train.timestep_batch must be >= 0 (0 = all steps at once), got {t.timestep_batch}",
        )
        need(
            t.on_nonfinite in ("stop", "skip"),
            f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}",
        )
        need(
            0 < t.ema_decay < 1,
            f"train.ema_decay must be in (0, 1), got {t.ema_decay}; set e.g. train.ema_decay=0.99",
        )
        need(t.device in ("cpu", "cuda", "auto"), f"train.device must be cpu, cuda or auto, got {t.device!r}")
        need(
            t.torch_threads is None or t.torch_threads >= 1,
            f"train.torch_threads must be >= 1 or null, got {t.torch_threads}",
        )
        collector.validate(self)
        from flowrl.samplers import validate_sampler

        validate_sampler(self)
        method.objective_class().validate(self)
        return self


def need(cond: bool, msg: str) -> None:
    """Raise a ConfigError with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)


_suggest = suggest


def lr_schedule_problem(schedule: str, warmup: int, final_ratio: float) -> str | None:
    """What is wrong with ``optim``'s learning-rate schedule fields, or None."""
    if schedule not in LR_SCHEDULES:
        return (
            f"optim.lr_schedule: unknown schedule {schedule!r}{_suggest(schedule, LR_SCHEDULES)}; "
            f"choose one of {list(LR_SCHEDULES)}"
        )
    if warmup < 0:
        return f"optim.lr_warmup must be >= 0, got {warmup}; set 0 for no warmup"
    if not 0 <= final_ratio <= 1:
        return (
            f"optim.lr_final_ratio must be in [0, 1], got {final_ratio}: it is the last step's learning rate "
            "as a fraction of the base one; set e.g. optim.lr_final_ratio=0.1"
        )
    return None


# keys of earlier flowrl versions (and of the separate robot schema) -> their names now
RENAMED = {
    "train.train_batch_size": "train.minibatch_size",
    "algorithm.inner_epochs": "train.update_epochs",
    "algorithm.update_epochs": "train.update_epochs",
    "algorithm.minibatch_size": "train.minibatch_size",
    "algorithm.logprob_reduction": "sampler.logprob_reduction",
    "algorithm.logprob_scope": "algorithm.ratio_scope",
    "algorithm.critic_warmup_iterations": "algorithm.critic_warmup_epochs",
    "algorithm.reinforce_baseline": "algorithm.advantage (batch_mean: the baseline; none: without)",
    "optim.actor_lr": "optim.learning_rate",
    "optim.critic_lr": "optim.value_learning_rate",
    "optim.critic_hidden_dims": "model.value_hidden_dims",
    "optim.lr_warmup_steps": "optim.lr_warmup (with optim.lr_schedule_unit=step)",
    "optim.lr_warmup_iterations": "optim.lr_warmup (with optim.lr_schedule_unit=epoch)",
    "train.num_iterations": "train.num_epochs",
    "train.init_from": "model.pretrained",
    "train.num_envs": "env.num_envs",
    "train.n_steps": "env.n_steps",
    "train.eval_episodes": "env.eval_episodes",
    "train.video": "env.video",
    "policy": "model (policy.kind: diffusion -> model.family: diffusion_policy, flow -> flow_policy)",
    "policy.kind": "model.family (diffusion -> diffusion_policy, flow -> flow_policy)",
    "policy.action_horizon": "model.action_horizon",
    "policy.hidden_dims": "model.hidden_dims",
    "policy.time_dim": "model.time_dim",
    "policy.num_train_steps": "model.num_train_steps",
}


# ---------------------------------------------------------------------- field documentation
@functools.cache
def field_docs(cls) -> dict[str, str]:
    """``{field: its one-line comment}`` of a config dataclass (the comment lines above the field)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    docs: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            docs[node.target.id] = " ".join(comment)
    return docs


# ---------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_EXAMPLES = {int: "4", float: "0.001", bool: "true", str: "some-text", list: "[a, b]", dict: "{key: value}"}


def _type_error(where: str, expected: str, value, example: str | None) -> ConfigError:
    fix = f"set it like {where}={example}" if example else f"give a {expected}"
    if isinstance(value, (int, float, bool)) and expected.startswith("str"):
        fix += f" (YAML reads {value!r} as {type(value).__name__}: quote it, \"{where}='{value}'\")"
    return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__}); {fix}")


def _coerce(value, tp, where: str, choices: tuple | None = None):
    """Check ``value`` against the annotation ``tp`` (ints pass as floats); raise ConfigError.

    ``choices``: the fixed values of a string field. YAML 1.1 reads ``no`` / ``yes`` / ``off`` /
    ``on`` as booleans, so for such a field False and True map back to the choice among ``no`` /
    ``off`` / ``false`` or ``yes`` / ``on`` / ``true`` (``train.mixed_precision=no``)."""
    if choices and isinstance(value, bool):
        for word in ("yes", "on", "true") if value else ("no", "off", "false"):
            if word in choices:
                return word
        raise ConfigError(
            f"{where}: got the boolean {value} (YAML reads yes/no/on/off as booleans); "
            f"set one of {', '.join(choices)}"
        )
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        real = [a for a in args if a is not type(None)]
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        example = _EXAMPLES.get(typing.get_origin(real[0]) or real[0]) if real else None
        raise _type_error(where, names, value, example)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(
                f"{where}: expected a section (a mapping of {tp.__name__} fields), got {value!r}; "
                f"set its keys one by one, e.g. {where}.{first}=..."
            )
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            if where == "rewards":
                raise ConfigError(
                    f"rewards: expected a list of rewards, got {value!r} ({type(value).__name__}); "
                    f"write rewards=[{{name: {value}}}]"
                )
            raise _type_error(where, "list", value, _EXAMPLES[list])
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(where, "mapping", value, _EXAMPLES[dict])
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is list and isinstance(value, list):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _type_error(where, _type_name(tp), value, _EXAMPLES.get(tp))


def _unknown_key(path: str, key, names: list[str]) -> ConfigError:
    if path in RENAMED:
        return ConfigError(
            f"config key {path!r} is now {RENAMED[path]}; rename it in the task file or override"
        )
    if path.startswith("algorithm."):  # an option of another objective than the method's
        from flowrl.objectives import OBJECTIVES, objective_class

        for name in OBJECTIVES:
            if key in {f.name for f in dataclasses.fields(objective_class(name).Options)}:
                return ConfigError(
                    f"config key {path!r} is an option of the {name} objective, not of this algorithm.name's; "
                    "remove it from the task (or override) when switching methods"
                )
    return ConfigError(
        f"unknown config key {path!r}{_suggest(str(key), names)}; valid keys here: {', '.join(names)}"
    )


def _from_dict(cls, data: dict, where: str = "", extra: type | None = None):
    """Build dataclass ``cls`` from ``data``; keys that are fields of ``extra`` (another dataclass)
    are parsed into it and returned as the ``options`` field (the algorithm section's objective
    options)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("hidden")}
    extra_fields = {f.name: f for f in dataclasses.fields(extra)} if extra is not None else {}
    names = list(fields) + list(extra_fields)
    kwargs, extra_data = {}, {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and key in extra_fields and key not in fields:
            extra_data[key] = value
            continue
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(path, key, names)
        kwargs[key] = _coerce(value, hints[key], path, fields[key].metadata.get("choices"))
    if extra is not None:
        kwargs["options"] = _from_dict(extra, extra_data, where)
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):  # rewards.0.weight=2
            if not k.isdigit() or int(k) >= len(node):
                example = ".".join([*keys[:i], "0", *keys[i + 1 :]])
                raise ConfigError(
                    f"override {dotted!r}: {k!r} is not an index of a {len(node)}-item list; "
                    f"use an index from 0 to {len(node) - 1}, e.g. {example}=..."
                    if node
                    else f"override {dotted!r}: the list is empty; set the whole list instead"
                )
            if last:
                node[int(k)] = value
            else:
                node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise ConfigError(
                f"override {dotted!r}: {keys[i - 1]!r} is not a section; set {'.'.join(keys[:i])} itself"
            )


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """``["train.num_epochs=5", "model.pretrained=./sd"]`` -> [(key, YAML-parsed value)]."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.num_epochs=5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        out.append((key.strip(), value))
    return out


def tasks_dir() -> Path:
    """Built-in task files: ``flowrl/_tasks`` in an installed wheel, else the checkout's ``tasks/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_tasks", here.parent / "tasks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("flowrl's built-in tasks folder is missing; reinstall flowrl")


def resolve_task_path(task: str) -> Path:
    """A task file by path, or by name among the built-in tasks (``jpeg_tiny`` or ``tasks/jpeg_tiny.yaml``)."""
    p = Path(task).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    builtin = tasks_dir() / name
    if builtin.is_file():
        return builtin
    known = sorted(f.stem for f in tasks_dir().glob("*.yaml"))
    raise ConfigError(
        f"task file {task!r} not found{_suggest(p.stem, known)}; built-in tasks: {', '.join(known)}"
    )


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section (lists and values replaced whole)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_task(task: str | None, overrides: list[str] | None = None) -> dict:
    """The task file's mapping with the overrides applied (nothing resolved or checked yet)."""
    data: dict = {}
    if task is not None:
        path = resolve_task_path(task)
        try:
            data = yaml.safe_load(read_text(path, "task file")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"task file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"task file {path} must be a mapping of sections (model, sampler, ...)")
    for key, value in parse_overrides(overrides or []):
        if key in RENAMED:
            raise ConfigError(f"config key {key!r} is now {RENAMED[key]}; rename it in the override")
        _set_path(data, key, value)
    return data


def from_dict(data: dict) -> TaskConfig:
    """A validated TaskConfig from a task mapping: the collector's and the method's defaults under
    the mapping's own values (see the module docstring)."""
    from flowrl.collectors import COLLECTORS, collector_class
    from flowrl.objectives import METHODS

    kind = data.get("kind", "text_to_image")
    if kind == "robot":
        raise ConfigError(
            "kind: robot is now kind: env (the environment collector); rename it in the task file"
        )
    if not isinstance(kind, str) or kind not in COLLECTORS:
        raise ConfigError(
            f"kind: unknown task kind {kind!r}{_suggest(str(kind), COLLECTORS)}; choose one of {list(COLLECTORS)}"
        )
    collector = collector_class(kind)
    for section in data:
        if section in SECTION_KINDS and kind not in SECTION_KINDS[section]:
            raise ConfigError(
                f"{section}: this section is for kind: {' or '.join(SECTION_KINDS[section])} tasks, and this task is "
                f"kind: {kind}; remove it{' (an environment task takes its reward from the env and clip_reward)' if section == 'rewards' else ''}"
            )
    merged = _merge(collector.DEFAULTS, data)
    name = (merged.get("algorithm") or {}).get("name", AlgorithmConfig.name)
    if isinstance(name, str) and name in METHODS:
        merged = _merge(_merge(_merge(collector.DEFAULTS, METHODS[name].defaults), data), METHODS[name].fixed)
        options = METHODS[name].objective_class().Options
    else:
        options = None
    algo = merged.get("algorithm") or {}
    if not isinstance(algo, dict):
        raise _type_error("algorithm", "section", algo, None)
    sections = {k: v for k, v in merged.items() if k != "algorithm"}
    cfg = _from_dict(TaskConfig, sections)
    cfg.algorithm = _from_dict(AlgorithmConfig, algo, "algorithm", extra=options)
    return cfg.validate()


# which kinds take which kind-only sections (every other section is shared)
SECTION_KINDS = {
    "rewards": ("text_to_image",),
    "env": ("env",),
    "clip_reward": ("env",),
    "demos": ("env",),
    "pretrain": ("env",),
}


def load_config(task: str | None = None, overrides: list[str] | None = None) -> TaskConfig:
    """Load a task file (or the defaults when None), apply overrides, resolve defaults, type-check
    and validate."""
    return from_dict(read_task(task, overrides))


def config_to_dict(cfg) -> dict:
    """The config as plain data, every key resolved (the objective's options flat in ``algorithm``,
    the kind-only sections of other kinds left out): a task file that reproduces the run."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, TaskConfig):
        algo = out["algorithm"]
        options = algo.pop("options", None)
        if options:
            algo.update(options)
        for section, kinds in SECTION_KINDS.items():
            if cfg.kind not in kinds:
                out.pop(section, None)
    return out
