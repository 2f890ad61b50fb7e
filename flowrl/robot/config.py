"""Robot task configuration: nested dataclasses read from a task file with ``kind: robot``.

Loading, type checks, overrides and unknown-key suggestions are flowrl.config's; every field has
a one-line comment; ``validate()`` names the field and the fix before any env or model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowrl.config import (
    ConfigError,
    _from_dict,
    _set_path,
    _suggest,
    lr_schedule_problem,
    parse_overrides,
    resolve_task_path,
)


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
    # an evaluation episode with at least this return is a success (null: success rate not logged)
    success_return: float | None = None


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
    # scripted expert that generates demonstrations when `path` is null: lqr | reacher_ik_pd
    expert: str | None = None
    # the expert's options (gains, weakening, noise_std), see flowrl.data.experts
    expert_kwargs: dict = field(default_factory=dict)
    # episodes to generate
    num_episodes: int = 50
    # seed of the first generated episode (then +1 per episode) and of the expert's noise
    seed: int = 1000


@dataclass
class PolicyConfig:
    # diffusion (DDPM, fine-tuned with DPPO) | flow (rectified flow, fine-tuned with ReinFlow)
    kind: str = "flow"
    # Ta, actions per predicted chunk (>= env.action_steps; DPPO/ReinFlow gym: 4)
    action_horizon: int = 4
    # widths of the denoiser MLP's hidden layers (DPPO/ReinFlow gym: [512, 512, 512])
    hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])
    # width of the sinusoidal time embedding (DPPO/ReinFlow: 16)
    time_dim: int = 16
    # diffusion: T, DDPM steps of pre-training (DPPO: 20)
    num_train_steps: int = 20


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
    # evaluation episodes of the BC policy at the end (null: train.eval_episodes, the same fixed seeds
    # as fine-tuning's evaluations, so the numbers compare; 0: no evaluation)
    eval_episodes: int | None = None


@dataclass
class RobotSamplerConfig:
    # diffusion: K, the last DDPM steps fine-tuned (DPPO: 10 of 20)
    ft_steps: int = 10
    # diffusion: floor on every step's std while fine-tuning (DPPO: 0.1)
    min_std: float = 0.1
    # flow: K, flow steps per chunk (ReinFlow: 1 to 4)
    num_steps: int = 4
    # flow: lower bound of the noise network's std (ReinFlow hopper: 0.10)
    noise_min_std: float = 0.1
    # flow: upper bound of the noise network's std (ReinFlow hopper: 0.24)
    noise_max_std: float = 0.24
    # flow: hidden widths of the noise network (ReinFlow: [64, 64])
    noise_hidden_dims: list[int] = field(default_factory=lambda: [64, 64])
    # how per-step log-probs reduce over the chunk: mean (clip range per dimension) or sum
    logprob_reduction: str = "mean"


@dataclass
class PPOConfig:
    # dppo (diffusion policy) | reinflow (flow policy)
    name: str = "reinflow"
    # discount per chunk step (DPPO/ReinFlow gym: 0.99)
    gamma: float = 0.99
    # GAE lambda (DPPO/ReinFlow gym: 0.95)
    gae_lambda: float = 0.95
    # PPO clip range on the ratios (DPPO/ReinFlow gym: 0.01)
    clip_range: float = 0.01
    # step: one ratio per (env step, denoising step) pair (DPPO); chain: one per env step, the
    # log-probs of its K steps summed (ReinFlow)
    logprob_scope: str = "step"
    # dppo: advantages of denoising step k weighted by this ** (K - 1 - k) (DPPO's gamma_denoising 0.99)
    denoising_discount: float = 1.0
    # entropy bonus on the noise network's std (ReinFlow hopper: 0.03; 0 = off)
    ent_coef: float = 0.0
    # value loss weight (DPPO/ReinFlow: 0.5)
    vf_coef: float = 0.5
    # passes over each iteration's data (DPPO/ReinFlow gym: 5)
    update_epochs: int = 5
    # samples per minibatch: (env step, denoising step) pairs for scope step, env steps for chain
    minibatch_size: int = 1024
    # stop an iteration's updates once the approximate KL exceeds this (DPPO/ReinFlow: 1.0; null: never)
    target_kl: float | None = 1.0
    # normalize advantages within each minibatch
    normalize_advantages: bool = True
    # divide rewards by the running std of the discounted return (DPPO/ReinFlow: reward_scale_running)
    reward_scaling: bool = True
    # first iterations that train only the value function
    critic_warmup_iterations: int = 0
    # weight of a behavior-cloning loss on the demonstrations added to every policy update
    # (DPPO's optional BC regularization; 0 = off)
    bc_coef: float = 0.0
    # demonstration windows per BC-regularization minibatch
    bc_batch_size: int = 256


@dataclass
class RobotOptimConfig:
    # AdamW learning rate of the policy (DPPO hopper: 1e-4; ReinFlow hopper: 4.5e-5)
    actor_lr: float = 1e-4
    # AdamW learning rate of the value network (DPPO hopper: 1e-3; ReinFlow hopper: 6.5e-4)
    critic_lr: float = 1e-3
    # AdamW weight decay (both)
    weight_decay: float = 0.0
    # gradient-norm clip, applied to policy and value network separately
    max_grad_norm: float = 1.0
    # learning rates of both networks after warmup, per iteration: constant | linear | cosine (both
    # decay to lr_final_ratio x the base rate at the last iteration)
    lr_schedule: str = "constant"
    # iterations of linear warmup of both learning rates (0 = none; DPPO's schedulers warm up too)
    lr_warmup_iterations: int = 0
    # linear / cosine: the learning rates of the last iteration, as a fraction of the base rates
    lr_final_ratio: float = 0.0
    # hidden widths of the value network (DPPO/ReinFlow: [256, 256, 256])
    critic_hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 256])


@dataclass
class RobotTrainConfig:
    # name of the run, its folder under output_dir (null: the task file's name)
    run_name: str | None = None
    # where run folders are written
    output_dir: str = "runs"
    # global seed: env resets, sampling noise and shuffles derive from (seed, iteration)
    seed: int = 0
    # fine-tuning iterations (each: rollout, GAE, PPO epochs)
    num_iterations: int = 20
    # parallel environments in rollouts (DPPO/ReinFlow gym: 40)
    num_envs: int = 8
    # chunk steps per environment per iteration; envs reset at every iteration, so make
    # n_steps x env.action_steps at least one episode (DPPO/ReinFlow gym: 500 x 4)
    n_steps: int = 250
    # evaluate every this many iterations (0 = only before and after)
    eval_every: int = 5
    # evaluation episodes, deterministic sampling, seeds eval_seed, eval_seed + 1, ... (>= 10)
    eval_episodes: int = 10
    # seed of the first evaluation episode (fixed, so every evaluation sees the same starts)
    eval_seed: int = 100000
    # write a checkpoint every this many iterations (0 = only at the end)
    save_every: int = 10
    # keep at most this many checkpoints (oldest deleted)
    keep_checkpoints: int = 2
    # resume from a checkpoint folder, or "auto" for the latest complete one in the run folder
    resume: str | None = None
    # BC policy folder to fine-tune (null: the pretrain output folder)
    init_from: str | None = None
    # render one evaluation episode to <run>/videos/*.gif at the end (needs a MuJoCo renderer)
    video: bool = False
    # cpu | cuda | auto
    device: str = "cpu"
    # torch threads set by `flowrl pretrain` / `flowrl train` (1 is fastest for these small networks)
    torch_threads: int = 1


@dataclass
class RobotTaskConfig:
    # marks a robot task file (flowrl train dispatches on it)
    kind: str = "robot"
    # one-line description of the task
    description: str = ""
    env: EnvConfig = field(default_factory=EnvConfig)
    clip_reward: ClipRewardConfig = field(default_factory=ClipRewardConfig)
    demos: DemoConfig = field(default_factory=DemoConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: RobotSamplerConfig = field(default_factory=RobotSamplerConfig)
    algorithm: PPOConfig = field(default_factory=PPOConfig)
    optim: RobotOptimConfig = field(default_factory=RobotOptimConfig)
    train: RobotTrainConfig = field(default_factory=RobotTrainConfig)

    def validate(self) -> RobotTaskConfig:
        """Check values that are well-typed but wrong; raise ConfigError naming field and fix."""
        e, p, s, a, t, d = self.env, self.policy, self.sampler, self.algorithm, self.train, self.demos

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(
            self.kind == "robot", f"kind must be 'robot' for a robot task, got {self.kind!r}; set kind: robot"
        )
        if ":" not in e.id:  # "module:Env" ids register themselves when gymnasium imports the module
            import gymnasium

            known = list(gymnasium.envs.registry)
            need(
                e.id in known,
                f"env.id: unknown environment {e.id!r}{_suggest(e.id, known)}; give a registered gymnasium id "
                "such as InvertedPendulum-v5, Hopper-v5 or Reacher-v5 (or module:EnvId for your own env)",
            )
        need(
            p.kind in POLICY_KINDS,
            f"policy.kind: unknown policy {p.kind!r}{_suggest(p.kind, POLICY_KINDS)}; choose one of {POLICY_KINDS}",
        )
        need(
            a.name in ALGORITHMS,
            f"algorithm.name: unknown algorithm {a.name!r}{_suggest(a.name, ALGORITHMS)}; choose one of {ALGORITHMS}",
        )
        need(
            ALGORITHMS[a.name] == p.kind,
            f"algorithm.name={a.name!r} fine-tunes a {ALGORITHMS[a.name]} policy but policy.kind={p.kind!r}; "
            f"use algorithm.name={'dppo' if p.kind == 'diffusion' else 'reinflow'}",
        )
        need(e.obs_horizon >= 1, f"env.obs_horizon must be >= 1, got {e.obs_horizon}")
        need(e.action_steps >= 1, f"env.action_steps must be >= 1, got {e.action_steps}")
        need(
            p.action_horizon >= e.action_steps,
            f"policy.action_horizon ({p.action_horizon}) must be >= env.action_steps ({e.action_steps}): a chunk cannot execute more actions than it holds",
        )
        need(
            len(p.hidden_dims) >= 1 and min(p.hidden_dims) >= 1,
            f"policy.hidden_dims must be positive widths, got {p.hidden_dims}",
        )
        need(p.num_train_steps >= 1, f"policy.num_train_steps must be >= 1, got {p.num_train_steps}")
        if p.kind == "diffusion":
            need(
                1 <= s.ft_steps <= p.num_train_steps,
                f"sampler.ft_steps must be in [1, policy.num_train_steps={p.num_train_steps}], got {s.ft_steps}",
            )
            need(
                s.min_std > 0,
                f"sampler.min_std must be > 0 (the last DDPM step has no other noise), got {s.min_std}",
            )
        need(
            s.num_steps >= 1,
            f"sampler.num_steps must be >= 1, got {s.num_steps}: a flow chain needs at least one step; "
            "set e.g. sampler.num_steps=4 (ReinFlow)",
        )
        need(
            0 < s.noise_min_std <= s.noise_max_std,
            f"sampler.noise_min_std and noise_max_std must satisfy 0 < min <= max, got {s.noise_min_std}, {s.noise_max_std}",
        )
        need(
            s.logprob_reduction in ("mean", "sum"),
            f"sampler.logprob_reduction must be 'mean' or 'sum', got {s.logprob_reduction!r}",
        )
        need(
            a.logprob_scope in ("step", "chain"),
            f"algorithm.logprob_scope must be 'step' or 'chain', got {a.logprob_scope!r}",
        )
        need(0 < a.gamma <= 1, f"algorithm.gamma must be in (0, 1], got {a.gamma}")
        need(0 <= a.gae_lambda <= 1, f"algorithm.gae_lambda must be in [0, 1], got {a.gae_lambda}")
        need(
            a.clip_range > 0,
            f"algorithm.clip_range must be > 0, got {a.clip_range}: a clip range <= 0 leaves no trust region; "
            "set e.g. algorithm.clip_range=0.01 (DPPO / ReinFlow gym)",
        )
        need(
            0 < a.denoising_discount <= 1,
            f"algorithm.denoising_discount must be in (0, 1], got {a.denoising_discount}",
        )
        need(a.ent_coef >= 0, f"algorithm.ent_coef must be >= 0, got {a.ent_coef}")
        need(a.bc_coef >= 0, f"algorithm.bc_coef must be >= 0, got {a.bc_coef}")
        need(a.bc_batch_size >= 1, f"algorithm.bc_batch_size must be >= 1, got {a.bc_batch_size}")
        need(a.update_epochs >= 1, f"algorithm.update_epochs must be >= 1, got {a.update_epochs}")
        need(a.minibatch_size >= 1, f"algorithm.minibatch_size must be >= 1, got {a.minibatch_size}")
        need(
            a.target_kl is None or a.target_kl > 0,
            f"algorithm.target_kl must be > 0 or null, got {a.target_kl}",
        )
        need(
            self.optim.actor_lr > 0 and self.optim.critic_lr > 0,
            f"optim.actor_lr and optim.critic_lr must be > 0, got {self.optim.actor_lr} and "
            f"{self.optim.critic_lr}; DPPO uses optim.actor_lr=1e-4 and optim.critic_lr=1e-3",
        )
        o = self.optim
        problem = lr_schedule_problem(
            o.lr_schedule, o.lr_warmup_iterations, o.lr_final_ratio, "lr_warmup_iterations"
        )
        need(problem is None, problem or "")
        for key in ("num_iterations", "num_envs", "n_steps"):
            need(
                getattr(t, key) >= 1,
                f"train.{key} must be >= 1, got {getattr(t, key)}; set a positive count, e.g. train.{key}=8",
            )
        need(
            t.eval_episodes >= 1,
            f"train.eval_episodes must be >= 1 (10 or more for a stated result), got {t.eval_episodes}",
        )
        need(t.device in ("cpu", "cuda", "auto"), f"train.device must be cpu, cuda or auto, got {t.device!r}")
        need(t.torch_threads >= 1, f"train.torch_threads must be >= 1, got {t.torch_threads}")
        need(
            d.format in DEMO_FORMATS,
            f"demos.format: unknown format {d.format!r}{_suggest(d.format, DEMO_FORMATS)}; choose one of {DEMO_FORMATS}",
        )
        need(
            d.path is not None or d.expert is not None,
            "demos: give a demonstrations file (demos.path) or a scripted expert (demos.expert)",
        )
        need(d.num_episodes >= 1, f"demos.num_episodes must be >= 1, got {d.num_episodes}")
        need(
            self.pretrain.steps >= 1 and self.pretrain.batch_size >= 1,
            "pretrain.steps and pretrain.batch_size must be >= 1",
        )
        c = self.clip_reward
        if c.enabled:
            need(
                c.goal_prompt.strip() != "",
                "clip_reward.goal_prompt must describe the goal when clip_reward.enabled",
            )
            need(0 <= c.alpha <= 1, f"clip_reward.alpha must be in [0, 1], got {c.alpha}")
            need(
                c.device in ("cpu", "cuda", "auto"),
                f"clip_reward.device must be cpu, cuda or auto, got {c.device!r}",
            )
        return self

    def bc_dir(self, task_name: str) -> Path:
        """Where ``flowrl pretrain`` writes the BC policy and fine-tuning reads it."""
        if self.pretrain.output_dir is not None:
            return Path(self.pretrain.output_dir)
        return Path(self.train.output_dir) / f"{task_name}_bc"


POLICY_KINDS = ["diffusion", "flow"]
ALGORITHMS = {"dppo": "diffusion", "reinflow": "flow"}
DEMO_FORMATS = ["npz", "d4rl", "robomimic", "minari"]


def is_robot_task(data: dict) -> bool:
    """A task file's parsed YAML is a robot task when it has ``kind: robot`` at the top."""
    return isinstance(data, dict) and data.get("kind") == "robot"


def load_robot_config(task: str | None = None, overrides: list[str] | None = None) -> RobotTaskConfig:
    """Load a robot task file (or the defaults when None), apply overrides, type-check and validate."""
    data: dict = {}
    if task is not None:
        path = resolve_task_path(task)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"task file {path} is not valid YAML: {e}") from e
        if not is_robot_task(data):
            raise ConfigError(f"task file {path} is not a robot task (it needs `kind: robot` at the top)")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    return _from_dict(RobotTaskConfig, data).validate()
