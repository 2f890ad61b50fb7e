"""RL fine-tuning of a BC policy in vectorized environments: rollout -> GAE -> PPO (DPPO, ReinFlow).

    N  environments   S  chunk steps per env per iteration (train.n_steps)   B = S * N samples
    K  fine-tuned denoising steps per chunk   Ta, Da  action chunk   To, Do  observation history

Each iteration: reset the N envs (seeds from (seed, iteration)), run S chunk steps with the
stochastic sampler, recording each chunk's denoising Chain; value the observations; GAE over the
S chunk steps; then ``update_epochs`` passes of PPO-clip with the value loss:

- DPPO (``logprob_scope: step``): minibatches of (env step, denoising step) pairs, one ratio per
  pair, the pair's advantage A_b * denoising_discount ** (K - 1 - k) (Ren et al. 2024).
- ReinFlow (``logprob_scope: chain``): minibatches of env steps, one ratio per env step with the
  log-probs of its K steps summed, plus an optional entropy bonus on the learned std (Zhang et al. 2025).

Randomness of an iteration derives from (seed, iteration) only and envs start fresh each
iteration, so a run resumed from a checkpoint repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from flowrl.chain import Chain
from flowrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowrl.config import ConfigError, config_to_dict
from flowrl.core import gaussian_entropy, policy_loss
from flowrl.core.gae import generalized_advantage_estimate
from flowrl.core.schedule import lr_factor, set_lr
from flowrl.envs.wrappers import executed_steps, make_vector_env
from flowrl.models.policy import ValueNet, load_policy
from flowrl.report import MetricsWriter
from flowrl.robot.config import RobotTaskConfig
from flowrl.robot.evaluate import act, build_policy_sampler, env_kwargs, evaluate, plot_learning_curve


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class RewardScaler:
    """Divides rewards by the running std of the discounted return (PPO's reward scaling, as
    DPPO's and ReinFlow's ``reward_scale_running``); its statistics are part of the training state."""

    def __init__(self, gamma: float):
        self.gamma = gamma
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """(S, N) rewards and episode ends in time order -> scaled rewards; updates the statistics."""
        ret = np.zeros(rewards.shape[1])
        returns = np.empty_like(rewards)
        for t in range(len(rewards)):
            ret = ret * self.gamma + rewards[t]
            returns[t] = ret
            ret = ret * (1 - dones[t])
        # Chan et al.'s parallel update of (mean, var, count) with the batch's returns
        b_mean, b_var, b_count = returns.mean(), returns.var(), returns.size
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total
        return rewards / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class RobotTrainer:
    """Fine-tunes a BC policy (``flowrl pretrain``) with DPPO or ReinFlow.

    Args:
        cfg: a validated :class:`~flowrl.robot.config.RobotTaskConfig`.
        task_name: names the run folder when ``train.run_name`` is null, and the BC folder.
    """

    def __init__(self, cfg: RobotTaskConfig, task_name: str = "task", progress: bool = True):
        t, a, s, o = cfg.train, cfg.algorithm, cfg.sampler, cfg.optim
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(t.output_dir) / (t.run_name or task_name)
        resume_from = self._resume_folder()
        self.device = torch.device(
            "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        init = Path(t.init_from) if t.init_from else cfg.bc_dir(task_name)
        self.policy = load_policy(init, self.device)
        if self.policy.kind != cfg.policy.kind:
            raise ConfigError(
                f"train.init_from: {init} holds a {self.policy.kind} policy but policy.kind={cfg.policy.kind!r}"
            )
        if self.policy.kind == "diffusion":
            self.policy.freeze_reference()  # the first T - K steps keep the BC network
        else:
            torch.manual_seed(t.seed)
            self.policy.add_noise_net(s.noise_min_std, s.noise_max_std, s.noise_hidden_dims)
        self.sampler = build_policy_sampler(cfg, self.policy)  # deterministic=True in evaluation
        torch.manual_seed(t.seed)
        self.value = ValueNet(self.policy.obs_dim, self.policy.obs_horizon, o.critic_hidden_dims).to(
            self.device
        )
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.policy.trainable_parameters(), "lr": o.actor_lr},
                {"params": list(self.value.parameters()), "lr": o.critic_lr},
            ],
            weight_decay=o.weight_decay,
        )
        self.reward_scaler = RewardScaler(a.gamma)
        if a.bc_coef > 0:  # the demonstrations as BC windows, normalized like the policy's inputs
            from flowrl.robot.pretrain import resolve_demonstrations

            obs_w, act_w = resolve_demonstrations(cfg, cfg.bc_dir(task_name)).windows(
                cfg.env.obs_horizon, self.policy.action_horizon
            )
            norm = self.policy.normalizer
            self.bc_obs = norm.normalize_obs(torch.as_tensor(obs_w, device=self.device))  # (M, To, Do)
            self.bc_actions = norm.normalize_action(torch.as_tensor(act_w, device=self.device)).clamp(-1, 1)
        self.start_iteration, self.env_steps, self.global_step = 0, 0, 0
        if resume_from is not None:
            self._load(resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        # rows are numbered by completed iterations: on resume keep those up to the checkpoint's
        self.metrics = MetricsWriter(
            self.run_dir / "metrics.jsonl",
            truncate_from_epoch=self.start_iteration + 1 if self.start_iteration else 0,
        )
        self.vec = make_vector_env(t.num_envs, **env_kwargs(cfg))

    # ------------------------------------------------------------------ checkpoints
    def _resume_folder(self) -> Path | None:
        t = self.cfg.train
        if t.resume is None:
            if latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(
                    f"run folder {self.run_dir} already has checkpoints: pass train.resume=auto to continue it, "
                    "or choose another train.run_name"
                )
            return None
        found = latest_checkpoint(self.run_dir) if t.resume == "auto" else Path(t.resume)
        if found is None or not (found / "state.json").is_file():
            raise ConfigError(
                f"train.resume={t.resume}: no complete checkpoint to resume from under {self.run_dir}/checkpoints; "
                "drop train.resume to start a new run, or give a checkpoints/epoch_* folder"
            )
        return found

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"policy.{k}": v for k, v in self.policy.state_dict().items()},
            **{f"value.{k}": v for k, v in self.value.state_dict().items()},
        }

    def _load(self, folder: Path) -> None:
        ckpt = load_checkpoint(folder, map_location=self.device)
        weights = ckpt["trainable"]
        self.policy.load_state_dict({k[7:]: v for k, v in weights.items() if k.startswith("policy.")})
        self.value.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("value.")})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        self.start_iteration, self.env_steps = state["next_iteration"], state["env_steps"]
        self.global_step = state["global_step"]
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        print(f"resumed from {folder} at iteration {self.start_iteration}")

    def save(self, next_iteration: int) -> Path:
        state = {
            "next_iteration": next_iteration,
            "env_steps": self.env_steps,
            "global_step": self.global_step,
            "reward_scaler": self.reward_scaler.state_dict(),
        }
        return save_checkpoint(
            self.run_dir,
            next_iteration,
            self.trainable_state_dict(),
            self.optimizer.state_dict(),
            state,
            extra_writer=self.policy.save,  # policy.safetensors + policy.json: loadable by load_policy
            keep=self.cfg.train.keep_checkpoints,
        )

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, iteration: int) -> tuple[Chain, dict]:
        """S chunk steps in N envs with exploration noise. Returns the B = S * N chunks' Chain
        (time-major: row s * N + n) with ``advantages`` and ``metadata["returns"]``, and stats."""
        t, a = self.cfg.train, self.cfg.algorithm
        S, N = t.n_steps, t.num_envs
        gen = torch.Generator().manual_seed(_seed_for(t.seed, iteration, 0))
        obs, _ = self.vec.reset(seed=[_seed_for(t.seed, iteration, 1, n) % (2**31) for n in range(N)])
        chains, next_obs_all = [], []
        rewards = np.zeros((S, N))
        terminated, done = np.zeros((S, N), bool), np.zeros((S, N), bool)
        episode_returns, chunk_steps = [], 0
        self.policy.eval()
        for step in range(S):
            chunk, chain = act(
                self.policy, self.sampler, obs, self.cfg.env.action_steps, gen, deterministic=False
            )
            obs_next, reward, term, trunc, info = self.vec.step(chunk)
            ended = term | trunc
            real_next = obs_next.copy()  # (N, To, Do): for ended episodes, their final observation
            if ended.any():
                real_next[ended] = np.stack(info["final_obs"][ended])
                episode_returns += list(info["final_info"]["episode_return"][ended])
            chains.append(chain)
            next_obs_all.append(real_next)
            rewards[step], terminated[step], done[step] = reward, term, ended
            chunk_steps += int(executed_steps(info, ended).sum())
            obs = obs_next
        if not np.isfinite(rewards).all():
            raise FloatingPointError(
                f"the environment {self.cfg.env.id} returned a non-finite reward at iteration {iteration}"
            )
        chain = Chain.cat(chains)  # (B, ...) with B = S * N, time-major
        obs_t = chain.cond["obs"]  # (B, To, Do), normalized
        next_t = self.policy.normalizer.normalize_obs(
            torch.as_tensor(np.concatenate(next_obs_all), device=self.device)
        )
        values = self.value(obs_t).view(S, N)
        next_values = self.value(next_t).view(S, N)
        raw_rewards = rewards
        if a.reward_scaling:
            rewards = self.reward_scaler(rewards, done)
        dev = self.device
        advantages, returns = generalized_advantage_estimate(
            torch.as_tensor(rewards, dtype=torch.float32, device=dev),
            values,
            next_values,
            torch.as_tensor(terminated, device=dev),
            torch.as_tensor(done, device=dev),
            a.gamma,
            a.gae_lambda,
        )  # (S, N) each
        chain.advantages = advantages.reshape(-1)  # (B,), time-major like the chain
        chain.rewards = torch.as_tensor(raw_rewards, dtype=torch.float32, device=dev).reshape(-1)
        chain.metadata["returns"] = returns.reshape(-1)
        chain.metadata["values"] = values.reshape(-1)
        self.env_steps += chunk_steps
        stats = {
            "train_return_mean": float(np.mean(episode_returns)) if episode_returns else None,
            "train_episodes": len(episode_returns),
            "env_steps_iteration": chunk_steps,
            "reward_chunk_mean": float(raw_rewards.mean()),
        }
        return chain, stats

    # ------------------------------------------------------------------ PPO update
    def update(self, iteration: int, chain: Chain) -> dict:
        """``update_epochs`` passes of PPO over the iteration's chunks; averaged diagnostics."""
        t, a, o = self.cfg.train, self.cfg.algorithm, self.cfg.optim
        B, K = len(chain), chain.num_steps
        returns, old_values = chain.metadata["returns"], chain.metadata["values"]
        train_actor = iteration >= a.critic_warmup_iterations
        factor = lr_factor(
            iteration, t.num_iterations, o.lr_warmup_iterations, o.lr_schedule, o.lr_final_ratio
        )
        set_lr(self.optimizer, [o.actor_lr, o.critic_lr], factor)
        g = torch.Generator().manual_seed(_seed_for(t.seed, iteration, 2))
        self.policy.train()
        sums: dict[str, float] = {}
        count, stopped_early = 0, False
        for _epoch in range(a.update_epochs):
            if a.logprob_scope == "step":  # (env step, denoising step) pairs, DPPO
                perm = torch.randperm(B * K, generator=g)
                batches = [
                    (perm[i : i + a.minibatch_size] // K, perm[i : i + a.minibatch_size] % K)
                    for i in range(0, B * K, a.minibatch_size)
                ]
            else:  # whole chains, ReinFlow
                perm = torch.randperm(B, generator=g)
                batches = [(perm[i : i + a.minibatch_size], None) for i in range(0, B, a.minibatch_size)]
            for rows, steps in batches:
                rows = rows.to(self.device)
                sub = chain.select(rows)
                adv = chain.advantages[rows]
                if a.normalize_advantages and len(rows) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                terms = {}
                if train_actor:
                    terms = self._policy_terms(sub, adv, None if steps is None else steps.to(self.device), K)
                    if a.bc_coef > 0:
                        i = torch.randint(0, len(self.bc_actions), (a.bc_batch_size,), generator=g)
                        i = i.to(self.device)
                        terms["loss_bc"] = self.policy.bc_loss(self.bc_obs[i], self.bc_actions[i])
                        terms["loss"] = terms["loss"] + a.bc_coef * terms["loss_bc"]
                v = self.value(sub.cond["obs"])
                loss_v = 0.5 * ((v - returns[rows]) ** 2).mean()
                loss = a.vf_coef * loss_v + (terms["loss"] if terms else 0.0)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at iteration {iteration}: update skipped; lower optim.actor_lr"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gn_pi = (
                    torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), o.max_grad_norm)
                    if train_actor
                    else torch.zeros(())
                )
                gn_v = torch.nn.utils.clip_grad_norm_(self.value.parameters(), o.max_grad_norm)
                self.optimizer.step()
                self.global_step += 1
                terms = {
                    **{k: float(v.detach()) for k, v in terms.items()},
                    "loss_value": float(loss_v.detach()),
                    "grad_norm_policy": float(gn_pi),
                    "grad_norm_value": float(gn_v),
                }
                for k, val in terms.items():
                    sums[k] = sums.get(k, 0.0) + val
                count += 1
                if a.target_kl is not None and terms.get("approx_kl", 0.0) > a.target_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        out = {k: v / count for k, v in sums.items()}
        with torch.no_grad():
            explained = 1 - (returns - old_values).var() / returns.var().clamp(min=1e-8)
        out.update(
            explained_variance=float(explained),
            stopped_early=stopped_early,
            updates=count,
            actor_lr=self.optimizer.param_groups[0]["lr"],
            critic_lr=self.optimizer.param_groups[1]["lr"],
        )
        return out

    def _policy_terms(self, sub: Chain, adv: torch.Tensor, steps: torch.Tensor | None, K: int) -> dict:
        """PPO terms for a minibatch: per (env step, denoising step) pair, or per whole chain."""
        a, red = self.cfg.algorithm, self.cfg.sampler.logprob_reduction
        M = len(sub)
        if steps is not None:  # DPPO: one ratio per pair; later denoising steps weigh more
            out = self.sampler.log_prob(self.policy, sub, steps)
            old = sub.log_probs.gather(1, steps[:, None]).squeeze(1)
            adv = adv * a.denoising_discount ** (K - 1 - steps).float()
            new_lp, std = out.log_prob, out.std
        else:  # ReinFlow: the chain's K log-probs summed, one ratio per env step
            rep = sub.select(torch.arange(M, device=adv.device).repeat_interleave(K))
            out = self.sampler.log_prob(self.policy, rep, torch.arange(K, device=adv.device).repeat(M))
            new_lp, old = out.log_prob.view(M, K).sum(1), sub.log_probs.sum(1)
            std = out.std
        entropy = None
        if a.ent_coef > 0:
            entropy = gaussian_entropy(std, out.mean.shape[1:], red).view(M, -1).mean(1)
        return policy_loss(new_lp, old, adv, a.clip_range, entropy=entropy, ent_coef=a.ent_coef)

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> dict:
        self.policy.eval()
        t = self.cfg.train
        return evaluate(self.policy, self.sampler, self.cfg, t.eval_episodes, t.eval_seed)

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        t = self.cfg.train
        history = []
        if self.start_iteration == 0:
            ev = self.evaluate()
            row = {
                "epoch": 0,
                "iteration": 0,
                "env_steps": 0,
                **{f"eval_{k}": v for k, v in ev.items() if k != "returns"},
            }
            row["eval_returns"] = ev["returns"]
            self.metrics.write(row)
            history.append(row)
        bar = tqdm(
            range(self.start_iteration, t.num_iterations),
            desc="iterations",
            initial=self.start_iteration,
            total=t.num_iterations,
            disable=not self.progress,
        )
        try:
            for it in bar:
                torch.manual_seed(_seed_for(t.seed, it, 3))
                t0 = time.perf_counter()
                chain, stats = self.rollout(it)
                t1 = time.perf_counter()
                info = self.update(it, chain)
                t2 = time.perf_counter()
                done = it + 1
                row = {
                    "epoch": done,
                    "iteration": done,
                    "env_steps": self.env_steps,
                    "global_step": self.global_step,
                    **stats,
                    **info,
                }
                row.update(
                    time_rollout=t1 - t0,
                    time_update=t2 - t1,
                    env_steps_per_s=stats["env_steps_iteration"] / (t1 - t0),
                )
                if (t.eval_every and done % t.eval_every == 0) or done == t.num_iterations:
                    ev = self.evaluate()
                    row.update(
                        {f"eval_{k}": v for k, v in ev.items() if k != "returns"}, eval_returns=ev["returns"]
                    )
                self.metrics.write(row)
                history.append(row)
                plot_learning_curve(
                    self.metrics.rows(), self.run_dir / "learning_curve.png", f"{self.run_dir.name}: return"
                )
                post = {"train": row["train_return_mean"]}
                if "eval_return_mean" in row:
                    post["eval"] = row["eval_return_mean"]
                bar.set_postfix({k: f"{v:.4g}" for k, v in post.items() if v is not None})
                if done == t.num_iterations or (t.save_every and done % t.save_every == 0):
                    self.save(done)
        finally:
            self.vec.close()
        if t.video and history:
            from flowrl.robot.evaluate import record_video, render_available

            if render_available():
                record_video(
                    self.policy,
                    self.sampler,
                    self.cfg,
                    self.run_dir / "videos" / f"iteration_{t.num_iterations:04d}.gif",
                    t.eval_seed,
                )
            else:
                print("train.video: no MuJoCo renderer here (try MUJOCO_GL=egl); skipped the video")
        return history
