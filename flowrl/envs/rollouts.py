"""Rollouts of a chunked policy in gymnasium environments: acting, deterministic evaluation over
fixed seeds, the learning-curve plot and rollout videos. The environment collector and behavior
cloning both evaluate with these.

    E  evaluation episodes (one env each)   To, Do, Ta, Da as in flowrl.models.policy
"""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from flowrl.envs.wrappers import make_env, make_vector_env
from flowrl.report import finish_plot


def format_return(ev: dict, prefix: str = "eval_") -> str:
    text = f"{ev[prefix + 'return_mean']:.1f} +/- {ev[prefix + 'return_std']:.1f}"
    if prefix + "success_rate" in ev:
        text += f" (success {ev[prefix + 'success_rate']:.0%})"
    return text


# ---------------------------------------------------------------------- rollouts
def env_kwargs(cfg) -> dict:
    """Keyword arguments of :func:`~flowrl.envs.wrappers.make_env` for a task config."""
    e = cfg.env
    kwargs = dict(
        env_id=e.id,
        obs_horizon=e.obs_horizon,
        action_steps=e.action_steps,
        env_kwargs=e.kwargs,
        max_episode_steps=e.max_episode_steps,
    )
    if cfg.clip_reward.enabled:
        from flowrl.envs.clip_reward import clip_reward_wrapper

        kwargs.update(render_mode="rgb_array", inner_wrappers=(clip_reward_wrapper(cfg.clip_reward),))
        kwargs["env_kwargs"] = dict(
            e.kwargs, width=cfg.clip_reward.render_size, height=cfg.clip_reward.render_size
        )
    return kwargs


@torch.no_grad()
def act(policy, sampler, obs: np.ndarray, action_steps: int, generator, deterministic: bool):
    """Observation histories (N, To, Do) in env units -> (chunk (N, Te, Da) in env units, Chain)."""
    chain = sampler.sample(
        policy, torch.as_tensor(obs, device=policy.device), generator=generator, deterministic=deterministic
    )
    chunk = policy.decode(chain.latents[:, -1, :action_steps])  # (N, Te, Da)
    return chunk.cpu().numpy(), chain


def evaluate(policy, sampler, cfg, num_episodes: int, seed: int) -> dict:
    """Mean and spread of the return over ``num_episodes`` episodes, reset seeds seed, seed+1, ...,
    along the sampler's mean path (no exploration noise; the initial noise from a generator seeded
    with ``seed``). Also the mean episode length and, when ``env.success_return`` is set, the
    success rate. ``sampler`` may be a :class:`~flowrl.guidance.GuidedSampler`."""
    vec = make_vector_env(num_episodes, **env_kwargs(cfg))
    obs, _ = vec.reset(seed=[seed + i for i in range(num_episodes)])
    gen = torch.Generator().manual_seed(seed)
    returns = np.full(num_episodes, np.nan)
    lengths = np.zeros(num_episodes, dtype=np.int64)
    active = np.ones(num_episodes, dtype=bool)
    while active.any():
        chunk, _ = act(policy, sampler, obs, cfg.env.action_steps, gen, deterministic=True)
        obs, _, terminated, truncated, info = vec.step(chunk)
        ended = (terminated | truncated) & active
        if ended.any():
            final = info["final_info"]
            returns[ended] = final["episode_return"][ended]
            lengths[ended] = final["episode_length"][ended]
            active &= ~ended
    vec.close()
    out = {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "length_mean": float(lengths.mean()),
        "returns": [float(r) for r in returns],
    }
    if cfg.env.success_return is not None:
        out["success_rate"] = float((returns >= cfg.env.success_return).mean())
    return out


def plot_learning_curve(rows: list[dict], path: str | os.PathLike, title: str) -> None:
    """Evaluation return (mean +/- std over the fixed-seed episodes) and the mean return of
    training episodes against environment steps, saved as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if "eval_return_mean" in r]
    tr = [r for r in rows if r.get("train_return_mean") is not None]
    if not ev and not tr:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if tr:
        ax.plot(
            [r["env_steps"] for r in tr],
            [r["train_return_mean"] for r in tr],
            alpha=0.6,
            label="training episodes (with exploration noise)",
        )
    if ev:
        x = np.array([r["env_steps"] for r in ev])
        m = np.array([r["eval_return_mean"] for r in ev])
        s = np.array([r["eval_return_std"] for r in ev])
        ax.plot(x, m, marker="o", ms=3, label="evaluation (deterministic, fixed seeds)")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    finish_plot(fig, ax, title, path)


def render_available() -> bool:
    """Whether MuJoCo can render offscreen here (set MUJOCO_GL=egl on a headless machine)."""
    try:
        env = gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=16, height=16)
        env.reset(seed=0)
        frame = env.render()
        env.close()
        return frame is not None and frame.shape == (16, 16, 3)
    except Exception:
        return False


class FrameRecorder(gym.Wrapper):
    """Keeps the rendered frame after every reset and simulator step."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.frames: list[np.ndarray] = []

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.frames.append(self.env.render())
        return out

    def step(self, action):
        out = self.env.step(action)
        self.frames.append(self.env.render())
        return out


@torch.no_grad()
def record_video(policy, sampler, cfg, path: str | os.PathLike, seed: int, size: int = 256) -> int:
    """Render one deterministic episode (reset seed ``seed``) to an animated GIF (every second
    simulator frame, real time); returns the number of frames written."""
    from PIL import Image

    recorders: list[FrameRecorder] = []

    def recorder(env: gym.Env) -> FrameRecorder:
        recorders.append(FrameRecorder(env))
        return recorders[-1]

    kwargs = env_kwargs(cfg)
    kwargs.update(
        render_mode="rgb_array",
        env_kwargs=dict(kwargs["env_kwargs"], width=size, height=size),
        inner_wrappers=(recorder, *kwargs.get("inner_wrappers", ())),
    )
    env = make_env(**kwargs)
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    done = False
    while not done:
        chunk, _ = act(policy, sampler, obs[None], cfg.env.action_steps, gen, deterministic=True)
        obs, _, terminated, truncated, _ = env.step(chunk[0])
        done = terminated or truncated
    dt = env.unwrapped.dt
    env.close()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in recorders[0].frames[::2]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(int(2000 * dt), 20), loop=0)
    return len(images)
