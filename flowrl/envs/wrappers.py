"""Environments for chunked policies: an action-chunk wrapper and vectorized gymnasium envs.

    N  environments   To  observation history   Do  observation dim   Te  actions executed per chunk

One step of a wrapped env executes a chunk of Te actions open-loop and returns the last To
observations, so one "environment step" of the RL problem (what GAE discounts over) is one chunk,
as in DPPO and ReinFlow. Its reward is the sum of the executed steps' rewards.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np


class ActionChunkWrapper(gym.Wrapper):
    """Execute a (Te, Da) action chunk; observe the (To, Do) history of the last To observations.

    The chunk stops early at a termination or truncation. ``info`` carries ``chunk_steps`` (env
    steps executed) and, at the end of an episode, ``episode_return`` and ``episode_length``
    (in env steps, rewards as the inner env gives them) and, when the env reports success
    (``info["is_success"]`` as gymnasium-robotics, or ``info["success"]`` as Meta-World), its
    ``episode_success``: 1.0 if any step of the episode reported it (the robomimic / Meta-World
    convention), else 0.0. Frames an inner :class:`~flowrl.envs.clip_reward.RenderFrames` puts in
    ``info["frame"]`` are handed on as the list ``info["frames"]``. At reset the history holds the
    first observation To times.
    """

    def __init__(self, env: gym.Env, obs_horizon: int, action_steps: int):
        super().__init__(env)
        if obs_horizon < 1 or action_steps < 1:
            raise ValueError(f"obs_horizon and action_steps must be >= 1, got {obs_horizon}, {action_steps}")
        self.obs_horizon, self.action_steps = obs_horizon, action_steps
        obs_space, act_space = env.observation_space, env.action_space
        self.observation_space = gym.spaces.Box(
            np.repeat(obs_space.low[None], obs_horizon, 0).astype(np.float32),
            np.repeat(obs_space.high[None], obs_horizon, 0).astype(np.float32),
        )
        self.action_space = gym.spaces.Box(
            np.repeat(act_space.low[None], action_steps, 0).astype(np.float32),
            np.repeat(act_space.high[None], action_steps, 0).astype(np.float32),
        )
        self._history: deque = deque(maxlen=obs_horizon)
        self._return, self._length = 0.0, 0
        self._success: bool | None = None  # None: the env reports no success signal

    def _observation(self) -> np.ndarray:
        return np.stack(self._history).astype(np.float32)  # (To, Do)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._history.extend([obs] * self.obs_horizon)
        self._return, self._length, self._success = 0.0, 0, None
        return self._observation(), info

    def step(self, chunk: np.ndarray):
        chunk = np.asarray(chunk)
        if chunk.shape != self.action_space.shape:
            raise ValueError(f"action chunk must have shape {self.action_space.shape}, got {chunk.shape}")
        total, terminated, truncated, info = 0.0, False, False, {}
        executed, frames = 0, []
        for action in chunk:
            obs, reward, terminated, truncated, info = self.env.step(action)
            if "frame" in info:
                frames.append(info["frame"])
            for key in ("is_success", "success"):
                if key in info:
                    self._success = bool(self._success) or bool(info[key])
            self._history.append(obs)
            total += float(reward)
            executed += 1
            if terminated or truncated:
                break
        self._return += total
        self._length += executed
        info = {k: v for k, v in info.items() if k != "frame"}
        info["chunk_steps"] = executed
        if frames:
            info["frames"] = frames
        if terminated or truncated:
            info.update(episode_return=self._return, episode_length=self._length)
            if self._success is not None:
                info["episode_success"] = float(self._success)
        return self._observation(), total, terminated, truncated, info


def load_triton_before_rendering() -> None:
    """Import triton (torch's compiler backend, which torch imports lazily, e.g. when an optimizer
    is built) before MuJoCo's EGL renderer starts: imported after Mesa's EGL has loaded its LLVM,
    triton's own LLVM crashes the process (a segmentation fault); imported first, both work."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def make_env(
    env_id: str,
    obs_horizon: int,
    action_steps: int,
    env_kwargs: dict | None = None,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
    inner_wrappers: tuple = (),
) -> gym.Env:
    """``gym.make(env_id)`` wrapped for action chunks; each of ``inner_wrappers`` (``env -> env``,
    e.g. a CLIP reward or a frame recorder) wraps the inner env first, acting per simulator step."""
    kwargs = dict(env_kwargs or {})
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if render_mode is not None:
        load_triton_before_rendering()
        kwargs["render_mode"] = render_mode
    env = gym.make(env_id, **kwargs)
    for wrap in inner_wrappers:
        env = wrap(env)
    return ActionChunkWrapper(env, obs_horizon, action_steps)


def make_vector_env(num_envs: int, vectorization: str = "sync", **make_kwargs) -> gym.vector.VectorEnv:
    """N chunked envs stepping in one process (``sync``) or in one subprocess each (``async``,
    gymnasium's AsyncVectorEnv: the same steps, for envs whose step costs more than the pipe).
    Autoreset is "same step": when an episode ends, the returned observation is already the next
    episode's first, and the last one of the ended episode is in ``info["final_obs"]`` (for
    bootstrapping truncated episodes)."""
    fns = [lambda: make_env(**make_kwargs) for _ in range(num_envs)]
    if vectorization == "async":
        # rendering envs start fresh processes: an EGL/OpenGL state forked from this one hangs
        context = "spawn" if make_kwargs.get("render_mode") is not None else None
        return gym.vector.AsyncVectorEnv(
            fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context=context
        )
    if vectorization != "sync":
        raise ValueError(f"vectorization must be sync or async, got {vectorization!r}")
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def executed_steps(info: dict, ended: np.ndarray) -> np.ndarray:
    """(N,) env steps executed by the last step of a vector env made by :func:`make_vector_env`.
    With same-step autoreset an ended episode's step info sits in ``info["final_info"]``."""
    steps = np.zeros(len(ended), dtype=np.int64)
    if "chunk_steps" in info:
        steps[info["_chunk_steps"]] = info["chunk_steps"][info["_chunk_steps"]]
    if ended.any():
        steps[ended] = info["final_info"]["chunk_steps"][ended]
    return steps
