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

from flowrl.envs.wrappers import load_triton_before_rendering, make_env, make_vector_env
from flowrl.errors import ConfigError
from flowrl.report import finish_plot


def format_return(ev: dict, prefix: str = "eval_") -> str:
    text = f"{ev[prefix + 'return_mean']:.1f} +/- {ev[prefix + 'return_std']:.1f}"
    if prefix + "success_rate" in ev:
        text += f" (success {ev[prefix + 'success_rate']:.0%})"
    return text


# ---------------------------------------------------------------------- rollouts
def env_kwargs(cfg, clip_frames: bool = False) -> dict:
    """Keyword arguments of :func:`~flowrl.envs.wrappers.make_env` for a task config; with
    ``clip_frames`` (and ``clip_reward.enabled``) each simulator step renders a frame for CLIP."""
    e = cfg.env
    kwargs = dict(
        env_id=e.id,
        obs_horizon=e.obs_horizon,
        action_steps=e.action_steps,
        env_kwargs=e.kwargs,
        max_episode_steps=e.max_episode_steps,
    )
    if clip_frames and cfg.clip_reward.enabled:
        from flowrl.envs.clip_reward import RenderFrames

        kwargs.update(render_mode="rgb_array", inner_wrappers=(RenderFrames,))
        kwargs["env_kwargs"] = dict(
            e.kwargs, width=cfg.clip_reward.render_size, height=cfg.clip_reward.render_size
        )
    return kwargs


def task_vector_env(cfg, num_envs: int, clip_reward: bool = False) -> gym.vector.VectorEnv:
    """The task's N chunked envs (``env.vectorization``); with ``clip_reward`` and
    ``clip_reward.enabled``, VLM-RM's CLIP reward added to the env's (training rollouts)."""
    use_clip = clip_reward and cfg.clip_reward.enabled
    vec = make_vector_env(num_envs, cfg.env.vectorization, **env_kwargs(cfg, clip_frames=use_clip))
    if use_clip:
        from flowrl.envs.clip_reward import CLIPRewardVectorEnv, shared_reward_model

        c = cfg.clip_reward
        vec = CLIPRewardVectorEnv(vec, shared_reward_model(c), c.weight, c.env_weight)
    return vec


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
    with ``seed``). Also the mean episode length and the success rate: the environment's own
    signal where it reports one (``episode_success``, see
    :class:`~flowrl.envs.wrappers.ActionChunkWrapper`), else return >= ``env.success_return`` when
    that is set. The return is the environment's own reward: a CLIP reward
    (``clip_reward.enabled``) shapes training only. ``sampler`` may be a
    :class:`~flowrl.guidance.GuidedSampler`."""
    vec = task_vector_env(cfg, num_episodes)
    obs, _ = vec.reset(seed=[seed + i for i in range(num_episodes)])
    gen = torch.Generator().manual_seed(seed)
    returns = np.full(num_episodes, np.nan)
    lengths = np.zeros(num_episodes, dtype=np.int64)
    successes = np.full(num_episodes, np.nan)  # NaN: the env reported no success signal
    active = np.ones(num_episodes, dtype=bool)
    while active.any():
        chunk, _ = act(policy, sampler, obs, cfg.env.action_steps, gen, deterministic=True)
        obs, _, terminated, truncated, info = vec.step(chunk)
        ended = (terminated | truncated) & active
        if ended.any():
            final = info["final_info"]
            returns[ended] = final["episode_return"][ended]
            lengths[ended] = final["episode_length"][ended]
            if "episode_success" in final:
                signal = ended & final["_episode_success"]
                successes[signal] = final["episode_success"][signal]
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
    if not np.isnan(successes).any():
        out["success_rate"], out["success_from"] = float(successes.mean()), "env"
    elif cfg.env.success_return is not None:
        out["success_rate"] = float((returns >= cfg.env.success_return).mean())
        out["success_from"] = f"return >= {cfg.env.success_return:g}"
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
    load_triton_before_rendering()
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


VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mkv", ".mov")


def check_video_path(path: str | os.PathLike) -> Path:
    """A video path flowrl can write: ``.gif`` (Pillow, always) or ``.mp4`` / ``.webm`` / ``.mkv`` /
    ``.mov`` (imageio with PyAV: ``pip install av``); anything else is a ConfigError saying so."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ConfigError(
            f"video {path}: unknown format {suffix!r}; give a .gif (or .mp4 with PyAV installed)"
        )
    if suffix != ".gif":
        try:
            import av  # noqa: F401
            import imageio  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"video {path}: writing {suffix} needs imageio and PyAV (pip install imageio av); or write a .gif"
            ) from None
    return path


@torch.no_grad()
def render_episode(policy, sampler, cfg, seed: int, size: int = 256) -> tuple[list[np.ndarray], float, float]:
    """One deterministic episode (reset seed ``seed``), rendered: (the frames after the reset and
    after every simulator step, (H, W, 3) uint8; the episode's env return; the simulator's dt)."""
    recorders: list[FrameRecorder] = []

    def recorder(env: gym.Env) -> FrameRecorder:
        recorders.append(FrameRecorder(env))
        return recorders[-1]

    kwargs = env_kwargs(cfg)
    kwargs.update(
        render_mode="rgb_array",
        env_kwargs=dict(kwargs["env_kwargs"], width=size, height=size),
        inner_wrappers=(recorder,),
    )
    env = make_env(**kwargs)
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    done, info = False, {}
    while not done:
        chunk, _ = act(policy, sampler, obs[None], cfg.env.action_steps, gen, deterministic=True)
        obs, _, terminated, truncated, info = env.step(chunk[0])
        done = terminated or truncated
    dt = env.unwrapped.dt
    env.close()
    return recorders[0].frames, float(info["episode_return"]), dt


def side_by_side(episodes: list[tuple[str, list[np.ndarray]]]) -> list[np.ndarray]:
    """Frames of several episodes, each under its label, concatenated horizontally; an episode
    that ended first holds its last frame (labelled "ended")."""
    from PIL import Image, ImageDraw

    length = max(len(frames) for _, frames in episodes)
    out = []
    for t in range(length):
        tiles = []
        for label, frames in episodes:
            frame = frames[min(t, len(frames) - 1)]
            band = Image.new("RGB", (frame.shape[1], 14), "white")
            text = label + (" (ended)" if t >= len(frames) else "")
            ImageDraw.Draw(band).text((2, 1), text[: frame.shape[1] // 6], fill="black")
            tiles.append(np.concatenate([np.asarray(band), frame], axis=0))  # (14 + H, W, 3)
        out.append(np.concatenate(tiles, axis=1))  # (14 + H, sum of W, 3)
    return out


def write_video(path: str | os.PathLike, frames: list[np.ndarray], fps: float) -> int:
    """Frames to a .gif (Pillow) or, with PyAV, an .mp4 / .webm / ... (imageio); written to a
    temporary name, then renamed. Returns the number of frames."""
    path = check_video_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        duration = max(int(round(1000 / fps)), 20)
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        import imageio.v3 as iio

        even = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]  # yuv420p: even sides
        iio.imwrite(
            tmp, np.stack(even), fps=fps, plugin="pyav", codec="libx264" if path.suffix == ".mp4" else None
        )
    os.replace(tmp, path)
    return len(frames)


def record_video(policy, sampler, cfg, path: str | os.PathLike, seed: int, size: int = 256) -> int:
    """Render one deterministic episode (reset seed ``seed``) to a video (every second simulator
    frame, real time); returns the number of frames written."""
    frames, _, dt = render_episode(policy, sampler, cfg, seed, size)
    return write_video(path, frames[::2], fps=1 / (2 * dt))


def record_comparison(
    runs: list[tuple[str, object, object]], cfg, path: str | os.PathLike, seed: int, size: int = 256
) -> list[float]:
    """The deterministic episodes from reset seed ``seed`` of several (label, policy, sampler),
    side by side in one video (every second simulator frame, real time; each label gets the
    episode's env return); returns the returns."""
    episodes, returns, dt = [], [], 0.02
    for label, policy, sampler in runs:
        frames, ret, dt = render_episode(policy, sampler, cfg, seed, size)
        episodes.append((f"{label}: return {ret:.0f}", frames[::2]))
        returns.append(ret)
    write_video(path, side_by_side(episodes), fps=1 / (2 * dt))
    return returns
