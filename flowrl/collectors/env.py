"""Environment collection: vector envs -> action chunks -> rewards -> values -> GAE.

    N  environments (per process)   S  chunk steps per env per epoch (env.n_steps)   B = S * N
    To, Do  observation history     Ta, Da  action chunk     Te  actions executed per chunk

Each epoch resets the N envs (seeds from (seed, epoch)), runs S chunk steps with the training
sampler, recording each chunk's denoising Chain (time-major: row s * N + n), and keeps every
step's reward, termination, episode end and next observation. Advantages are GAE over the S
chunk steps (Schulman et al. 2016) with a value function trained beside the policy, rewards
divided by the running std of the discounted return (DPPO's and ReinFlow's
``reward_scale_running``); with ``env.normalize_obs`` the policy's observation statistics are
running ones, updated by every training observation (:mod:`flowrl.envs.normalize`). Envs start
fresh each epoch, so a resumed run repeats the uninterrupted one exactly.

Evaluation runs ``env.eval_episodes`` episodes with reset seeds eval_seed, eval_seed + 1, ...
along the sampler's mean path (no exploration noise), the same starts at every evaluation.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.collectors.base import Collector
from flowrl.core import seeding
from flowrl.core.gae import generalized_advantage_estimate
from flowrl.envs.normalize import ObservationNormalizer, RewardScaler
from flowrl.envs.rollouts import (
    act,
    format_return,
    plot_learning_curve,
    record_video,
    render_available,
    task_vector_env,
)
from flowrl.envs.rollouts import evaluate as evaluate_policy
from flowrl.envs.wrappers import executed_steps
from flowrl.errors import ConfigError, suggest

# the env kind's layer of defaults (DPPO's and ReinFlow's gym settings, at laptop size)
DEFAULTS = {
    "model": {"pretrained": None, "family": "flow_policy", "finetune": "full"},
    "sampler": {"num_steps": 4},
    "algorithm": {"name": "reinflow", "clip_range": 0.01, "target_kl": 1.0, "normalize_advantages": True},
    "optim": {"learning_rate": 1e-4, "weight_decay": 0.0},
    "train": {
        "update_epochs": 5,
        "minibatch_size": 1024,
        "save_every": 10,
        "keep_checkpoints": 2,
        "eval_seed": 100000,
        "device": "cpu",
        "torch_threads": 1,
    },
}
DEMO_FORMATS = ["npz", "d4rl", "robomimic", "minari"]


class EnvCollector(Collector):
    kind = "env"
    DEFAULTS = DEFAULTS
    ADVANTAGES = ("gae", "none")  # none: an off-policy objective's own critic (DSRL-SAC)
    SEED_SCHEME = "env"

    @classmethod
    def validate(cls, cfg) -> None:
        e, d, m, s, p = cfg.env, cfg.demos, cfg.model, cfg.sampler, cfg.pretrain
        if ":" not in e.id:  # "module:Env" ids register themselves when gymnasium imports the module
            known = list(gym.envs.registry)
            if e.id not in known:
                raise ConfigError(
                    f"env.id: unknown environment {e.id!r}{suggest(e.id, known)}; give a registered gymnasium id "
                    "such as InvertedPendulum-v5, Hopper-v5 or Reacher-v5 (or module:EnvId for your own env)"
                )
        else:  # your own env: importing the module (code that runs) registers it
            import importlib

            module, _, env_name = e.id.partition(":")
            try:
                importlib.import_module(module)
            except BaseException as err:  # ImportError, an error in the module, sys.exit() at import
                if isinstance(err, KeyboardInterrupt):
                    raise
                raise ConfigError(
                    f"env.id={e.id!r}: module {module!r} could not be imported ({type(err).__name__}: {err}); "
                    "put the module on PYTHONPATH and fix it, or give a registered gymnasium id"
                ) from None
            if env_name not in gym.envs.registry:
                raise ConfigError(
                    f"env.id={e.id!r}: importing {module!r} registered no environment {env_name!r}; call "
                    f"gymnasium.register(id={env_name!r}, ...) in it, or fix the id after the ':'"
                )
        if e.normalize_obs and m.pretrained != "scratch":
            raise ConfigError(
                "env.normalize_obs: running observation statistics would replace the pre-trained policy's own "
                "(fit on its demonstrations); use it with model.pretrained=scratch, or set env.normalize_obs=false"
            )
        if m.finetune != "full":
            raise ConfigError(
                f"model.finetune={m.finetune!r}: policies fine-tune all weights; set model.finetune=full"
            )
        # method -> (the policy family it fine-tunes, the samplers it is defined on; the first its default)
        chains = {
            "dppo": ("diffusion_policy", ("ddpm", "ddim")),
            "reinflow": ("flow_policy", ("reinflow",)),
            "pirl_flow_sde": ("flow_policy", ("flow_sde",)),
            "pirl_flow_noise": ("flow_policy", ("flow_noise",)),
        }
        family = m.family
        if cfg.algorithm.name in chains:
            fits, samplers = chains[cfg.algorithm.name]
            if s.name not in (None, *samplers):
                raise ConfigError(
                    f"algorithm.name={cfg.algorithm.name!r} is defined on the {' or '.join(samplers)} sampler, not "
                    f"sampler.name={s.name!r}; set sampler.name={samplers[0]}"
                )
            if family != "auto" and family != fits:
                other = {"diffusion_policy": "dppo", "flow_policy": "reinflow"}.get(family, "dppo")
                raise ConfigError(
                    f"algorithm.name={cfg.algorithm.name!r} fine-tunes a {fits} but model.family={family!r}; "
                    f"use algorithm.name={other}"
                )
        if cfg.advantage == "none" and not hasattr(cfg.method.objective_class(), "observe"):
            raise ConfigError(
                f"algorithm.advantage=none: {cfg.algorithm.name} learns from GAE advantages on env tasks; "
                "set algorithm.advantage=gae (only an off-policy method such as dsrl_sac learns without)"
            )
        for name, value in (("env.obs_horizon", e.obs_horizon), ("env.action_steps", e.action_steps)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if m.action_horizon < e.action_steps:
            raise ConfigError(
                f"model.action_horizon ({m.action_horizon}) must be >= env.action_steps ({e.action_steps}): a chunk "
                "cannot execute more actions than it holds"
            )
        if not m.hidden_dims or min(m.hidden_dims) < 1:
            raise ConfigError(f"model.hidden_dims must be positive widths, got {m.hidden_dims}")
        if m.num_train_steps < 1:
            raise ConfigError(f"model.num_train_steps must be >= 1, got {m.num_train_steps}")
        for key in ("num_envs", "n_steps"):
            if getattr(e, key) < 1:
                raise ConfigError(
                    f"env.{key} must be >= 1, got {getattr(e, key)}; set a positive count, e.g. env.{key}=8"
                )
        if e.eval_episodes < 1:
            raise ConfigError(
                f"env.eval_episodes must be >= 1 (10 or more for a stated result), got {e.eval_episodes}"
            )
        if e.vectorization not in ("sync", "async"):
            raise ConfigError(
                f"env.vectorization must be sync (one process) or async (a subprocess per env), got {e.vectorization!r}"
            )
        if d.format not in DEMO_FORMATS:
            raise ConfigError(
                f"demos.format: unknown format {d.format!r}{suggest(d.format, DEMO_FORMATS)}; choose one of {DEMO_FORMATS}"
            )
        from_scratch = m.pretrained == "scratch" and cfg.algorithm.bc_coef <= 0  # PPO needs no demonstrations
        if d.path is None and d.expert is None and not from_scratch:
            raise ConfigError(
                "demos: give a demonstrations file (demos.path) or a scripted expert (demos.expert)"
            )
        if d.num_episodes < 1:
            raise ConfigError(f"demos.num_episodes must be >= 1, got {d.num_episodes}")
        if p.steps < 1 or p.batch_size < 1:
            raise ConfigError("pretrain.steps and pretrain.batch_size must be >= 1")
        c = cfg.clip_reward
        if c.enabled:
            if c.goal_prompt.strip() == "":
                raise ConfigError("clip_reward.goal_prompt must describe the goal when clip_reward.enabled")
            if not 0 <= c.alpha <= 1:
                raise ConfigError(f"clip_reward.alpha must be in [0, 1], got {c.alpha}")
            if c.device not in ("cpu", "cuda", "auto"):
                raise ConfigError(f"clip_reward.device must be cpu, cuda or auto, got {c.device!r}")

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self.policy = run.adapter
        self.reward_scaler = RewardScaler(cfg.algorithm.gamma)
        self.obs_norm = None  # env.normalize_obs: running statistics in the policy's normalizer
        if cfg.env.normalize_obs:
            gather = run.accelerator.gather if run.world > 1 else None
            self.obs_norm = ObservationNormalizer(self.policy.normalizer, gather)
        self.env_steps = 0
        self.vec = task_vector_env(cfg, cfg.env.num_envs, clip_reward=True)

    def value_function(self):
        from flowrl.models.policy import ValueNet

        torch.manual_seed(self.cfg.train.seed)
        p = self.policy
        return ValueNet(p.obs_dim, p.obs_horizon, self.cfg.model.value_hidden_dims).to(self.run.device)

    def demonstrations(self):
        """The demonstrations as normalized BC windows (for ``algorithm.bc_coef``)."""
        if self.cfg.algorithm.bc_coef <= 0:
            return None
        from flowrl.data.experts import resolve_demonstrations

        cfg, p = self.cfg, self.policy
        obs_w, act_w = resolve_demonstrations(cfg, cfg.bc_dir(self.run.task_name)).windows(
            cfg.env.obs_horizon, p.action_horizon
        )
        norm, device = p.normalizer, self.run.device
        obs = norm.normalize_obs(torch.as_tensor(obs_w, device=device))  # (M, To, Do)
        actions = norm.normalize_action(torch.as_tensor(act_w, device=device)).clamp(-1, 1)  # (M, Ta, Da)
        return obs, actions

    # ------------------------------------------------------------------ one epoch
    @torch.no_grad()
    def collect(self, epoch: int) -> tuple[Chain, dict]:
        """S chunk steps in N envs with exploration noise: the B = S * N chunks' Chain (time-major)
        with ``rewards`` (B,) the chunks' env rewards, and the GAE inputs in ``metadata``."""
        run, e = self.run, self.cfg.env
        S, N = e.n_steps, e.num_envs
        gen = run.seeds.generator(epoch, seeding.SAMPLE)
        obs, _ = self.vec.reset(seed=[run.seeds.int(epoch, seeding.RESET, n) % (2**31) for n in range(N)])
        norm = self.policy.normalizer
        if self.obs_norm is not None:  # gymnasium's NormalizeObservation: update, then normalize
            self.obs_norm.update(obs)
        chains, next_obs_all = [], []
        rewards = np.zeros((S, N))
        terminated, done = np.zeros((S, N), bool), np.zeros((S, N), bool)
        episode_returns, chunk_steps = [], 0
        clip_terms = {"env": [], "clip": []}  # with clip_reward: the episodes' two return terms
        for step in range(S):
            with run.accelerator.autocast():
                chunk, chain = act(self.policy, run.sampler, obs, e.action_steps, gen, deterministic=False)
            obs_next, reward, term, trunc, info = self.vec.step(chunk)
            ended = term | trunc
            real_next = obs_next.copy()  # (N, To, Do): for ended episodes, their final observation
            if ended.any():
                real_next[ended] = np.stack(info["final_obs"][ended])
                episode_returns += list(info["final_info"]["episode_return"][ended])
                for k, v in clip_terms.items():
                    v += list(info["final_info"].get(f"episode_return_{k}", np.zeros(N))[ended])
            if self.obs_norm is not None:
                self.obs_norm.update(obs_next)
            chains.append(chain)
            # normalized with the statistics the next step's observation sees (the value bootstrap agrees)
            next_obs_all.append(norm.normalize_obs(torch.as_tensor(real_next, device=run.device)))
            rewards[step], terminated[step], done[step] = reward, term, ended
            chunk_steps += int(executed_steps(info, ended).sum())
            if hasattr(run.objective, "observe"):  # an off-policy objective learns between steps (DSRL-SAC)
                run.objective.observe(run, epoch, chain, obs, reward, term, trunc, real_next)
            obs = obs_next
        chain = Chain.cat(chains)  # (B, ...) with B = S * N, time-major
        device = run.device
        chain.rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device).reshape(-1)
        chain.metadata.update(
            step_rewards=rewards,  # (S, N) float64, what GAE and the reward scaler see
            terminated=terminated,
            done=done,
            next_obs=torch.cat(next_obs_all),
        )
        steps = int(run.accelerator.reduce(torch.tensor(chunk_steps, device=device), "sum"))
        self.env_steps += steps
        stats = {
            "env_steps": self.env_steps,
            "train_return_mean": float(np.mean(episode_returns)) if episode_returns else None,
            "train_episodes": len(episode_returns),
            "env_steps_epoch": steps,
            "reward_chunk_mean": float(rewards.mean()),
        }
        if self.cfg.clip_reward.enabled:  # the two terms of the training return, apart
            for k, v in clip_terms.items():
                stats[f"train_return_{k}_mean"] = float(np.mean(v)) if v else None
        return chain, stats

    @torch.no_grad()
    def advantages(self, chain: Chain) -> tuple[Tensor, dict]:
        """GAE(gamma, lambda) over the S chunk steps with the value function; the TD(lambda)
        returns (the value targets) go to ``metadata["returns"]``."""
        e, a, device = self.cfg.env, self.cfg.algorithm, self.run.device
        if self.run.value is None:  # algorithm.advantage=none: the objective learns from its own critic
            return torch.zeros(len(chain), device=device), {}
        S, N = e.n_steps, e.num_envs
        md = chain.metadata
        value = self.run.value
        values = value(chain.cond["obs"]).view(S, N)
        next_values = value(md["next_obs"]).view(S, N)
        rewards = md["step_rewards"]
        if a.reward_scaling:
            rewards = self.reward_scaler(rewards, md["done"])
        advantages, returns = generalized_advantage_estimate(
            torch.as_tensor(rewards, dtype=torch.float32, device=device),
            values,
            next_values,
            torch.as_tensor(md["terminated"], device=device),
            torch.as_tensor(md["done"], device=device),
            a.gamma,
            a.gae_lambda,
        )  # (S, N) each
        md["returns"] = returns.reshape(-1)  # (B,), time-major like the chain
        explained = 1 - (md["returns"] - values.reshape(-1)).var() / md["returns"].var().clamp(min=1e-8)
        return advantages.reshape(-1), {"explained_variance": float(explained)}

    def describe(self, chain: Chain, rows: list[int]) -> str:
        N = self.cfg.env.num_envs
        return f"env steps {[r // N for r in rows[:4]]} of envs {[r % N for r in rows[:4]]}"

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, epoch: int) -> dict:
        """Deterministic episodes from the fixed evaluation seeds (main process only); at the end
        of a run with ``env.video``, one episode rendered to ``videos/``."""
        run = self.run
        if not run.accelerator.is_main_process:
            return {}
        self.policy.eval()
        ev = evaluate_policy(
            self.policy, run.sampler, self.cfg, self.cfg.env.eval_episodes, self.cfg.eval_seed
        )
        row = {"env_steps": self.env_steps, **{f"eval_{k}": v for k, v in ev.items() if k != "returns"}}
        row["eval_returns"] = ev["returns"]
        if self.cfg.env.video:  # at every evaluation: the BC policy (epoch 0), ..., the last epoch
            if render_available():
                path = run.run_dir / "videos" / f"epoch_{epoch:04d}.gif"
                record_video(self.policy, run.sampler, self.cfg, path, self.cfg.eval_seed)
            else:
                print("env.video: no MuJoCo renderer here (try MUJOCO_GL=egl); skipped the video")
        return row

    def plot(self, rows: list[dict]) -> None:
        if rows and "eval_return_mean" not in rows[-1]:
            return  # redrawn at each evaluation and at the end: a redraw costs ~1 s of matplotlib per epoch
        run_dir = self.run.run_dir
        plot_learning_curve(rows, run_dir / "learning_curve.png", f"{run_dir.name}: return")

    def postfix(self, row: dict) -> dict:
        post = {"train": row.get("train_return_mean")}
        if "eval_return_mean" in row:
            post["eval"] = row["eval_return_mean"]
        return {k: f"{v:.4g}" for k, v in post.items() if v is not None}

    def summary(self, history: list[dict]) -> list[str]:
        evals = [r for r in history if "eval_return_mean" in r]
        lines = []
        if evals:
            first, last = evals[0], evals[-1]
            lines.append(
                f"evaluation return ({self.cfg.env.eval_episodes} fixed-seed episodes, deterministic): "
                f"epoch {first['epoch']} {format_return(first)} -> epoch {last['epoch']} {format_return(last)}"
            )
        lines.append(f"run folder: {self.run.run_dir} (metrics.jsonl, learning_curve.png, checkpoints/)")
        return lines

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"env_steps": self.env_steps, "reward_scaler": self.reward_scaler.state_dict()}
        if self.obs_norm is not None:
            state["obs_norm"] = self.obs_norm.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.env_steps = state["env_steps"]
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        if self.obs_norm is not None:
            if "obs_norm" not in state:
                raise ConfigError(
                    "env.normalize_obs is on but the checkpoint has no observation statistics (trained without "
                    "it); resume with env.normalize_obs=false"
                )
            self.obs_norm.load_state_dict(state["obs_norm"])

    def close(self) -> None:
        self.vec.close()
