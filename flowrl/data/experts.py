"""Scripted demonstrators for the embedded tasks, so behavior cloning needs no download.

They are deliberately imperfect, so the cloned policy leaves room for RL:

- ``lqr`` (InvertedPendulum, InvertedDoublePendulum): an LQR controller from the simulator's
  linearization about the upright state, optionally weakened: its gain scaled by
  ``gain_scale`` and the feedback on the state entries in ``drop`` removed (e.g. the cart
  position, so the cart drifts). It reads the true state (qpos, qvel) from the simulator.
- ``reacher_ik_pd`` (Reacher): inverse kinematics of the two-link arm to the target, then a PD
  controller on the joint angles with gains ``kp``, ``kd``, which overshoots and spends control.
  It reads only the observation.

- ``policy``: a trained flowrl policy folder of any family (a BC folder or a checkpoint) rolled
  out as the demonstrator, e.g. a locomotion expert trained from scratch with the Gaussian PPO
  baseline; see :mod:`flowrl.data.policy_expert`.

Each adds Gaussian action noise ``noise_std`` (in the env's units) so the data covers more states.
Expert names are looked up in :data:`EXPERTS`; :func:`collect_demonstrations` runs one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from flowrl.data.demos import Demonstrations, load_demonstrations
from flowrl.errors import ConfigError, MissingFileError


class Expert(Protocol):
    def __call__(self, env, obs: np.ndarray) -> np.ndarray:
        """The action (env units, before clipping) for ``obs`` in ``env`` (the unwrapped env is reachable)."""
        ...


def linearize(env, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Discrete-time (A, B) of one env step (frame_skip simulator steps) about qpos = qvel = ctrl = 0,
    by central differences of ``mj_step``; the state is x = (qpos, qvel)."""
    import mujoco

    u = env.unwrapped
    m, fs = u.model, u.frame_skip
    nx, nu = m.nq + m.nv, m.nu

    def f(x: np.ndarray, a: np.ndarray) -> np.ndarray:
        d = mujoco.MjData(m)
        d.qpos[:], d.qvel[:], d.ctrl[:] = x[: m.nq], x[m.nq :], a
        for _ in range(fs):
            mujoco.mj_step(m, d)
        return np.concatenate([d.qpos, d.qvel])

    x0, a0 = np.zeros(nx), np.zeros(nu)
    A = np.stack([(f(x0 + e, a0) - f(x0 - e, a0)) / (2 * eps) for e in eps * np.eye(nx)], 1)
    B = np.stack([(f(x0, a0 + e) - f(x0, a0 - e)) / (2 * eps) for e in eps * np.eye(nu)], 1)
    return A, B


def lqr_gain(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, iters: int = 10000) -> np.ndarray:
    """K of the infinite-horizon discrete LQR (u = -K x), by iterating the Riccati equation
    P <- Q + A'P(A - BK), K = (R + B'PB)^-1 B'PA until it stops changing."""
    P = Q.copy()
    for _ in range(iters):
        K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P_next = Q + A.T @ P @ (A - B @ K)
        if np.abs(P_next - P).max() < 1e-10:
            break
        P = P_next
    return K


class LQRExpert:
    """u = -gain_scale * K_dropped x + noise, x = (qpos, qvel) read from the simulator."""

    def __init__(
        self,
        env,
        q: list[float] | None = None,
        r: float = 1.0,
        gain_scale: float = 1.0,
        drop: list[int] | None = None,
        noise_std: float = 0.0,
        seed: int = 0,
    ):
        A, B = linearize(env)
        Q = np.diag(q) if q is not None else np.eye(A.shape[0])
        if Q.shape[0] != A.shape[0]:
            raise ConfigError(f"lqr expert: q needs {A.shape[0]} entries (qpos, qvel), got {len(q)}")
        self.K = gain_scale * lqr_gain(A, B, Q, r * np.eye(B.shape[1]))
        self.K[:, list(drop or [])] = 0.0
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed)

    def __call__(self, env, obs: np.ndarray) -> np.ndarray:
        d = env.unwrapped.data
        x = np.concatenate([d.qpos, d.qvel])
        return -self.K @ x + self.noise_std * self.rng.normal(size=self.K.shape[0])


class ReacherIKPDExpert:
    """Reacher-v5: joint targets by inverse kinematics (the elbow solution nearer the current
    angles), u = kp * wrap(q* - q) - kd * dq + noise. Link lengths 0.1 and 0.11 (reacher.xml)."""

    def __init__(self, kp: float = 2.0, kd: float = 0.2, noise_std: float = 0.0, seed: int = 0):
        self.kp, self.kd, self.noise_std = kp, kd, noise_std
        self.rng = np.random.default_rng(seed)

    def __call__(self, env, obs: np.ndarray) -> np.ndarray:
        l1, l2 = 0.1, 0.11
        q = np.arctan2(obs[2:4], obs[0:2])  # obs = cos q, sin q, target, dq, fingertip - target
        dq, (tx, ty) = obs[6:8], obs[4:6]
        c2 = np.clip((tx * tx + ty * ty - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
        best = None
        for elbow in (1.0, -1.0):
            q2 = elbow * np.arccos(c2)
            q1 = np.arctan2(ty, tx) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
            err = (np.array([q1, q2]) - q + np.pi) % (2 * np.pi) - np.pi
            if best is None or np.abs(err).sum() < np.abs(best).sum():
                best = err
        return self.kp * best - self.kd * dq + self.noise_std * self.rng.normal(size=2)


def _policy_expert(env, seed: int = 0, **kwargs):
    from flowrl.data.policy_expert import PolicyExpert

    return PolicyExpert(env, seed=seed, **kwargs)


EXPERTS = {"lqr": LQRExpert, "reacher_ik_pd": ReacherIKPDExpert, "policy": _policy_expert}


def make_expert(name: str, env, seed: int = 0, **kwargs) -> Expert:
    if name not in EXPERTS:
        raise ConfigError(f"demos.expert: unknown expert {name!r}; built-in experts: {sorted(EXPERTS)}")
    if name in ("lqr", "policy"):  # these read the env (its simulator, its spaces)
        return EXPERTS[name](env, seed=seed, **kwargs)
    return EXPERTS[name](seed=seed, **kwargs)


def collect_demonstrations(
    env_id: str,
    expert: str,
    num_episodes: int,
    seed: int = 0,
    env_kwargs: dict | None = None,
    expert_kwargs: dict | None = None,
) -> Demonstrations:
    """Run ``expert`` for ``num_episodes`` episodes (reset seeds seed, seed+1, ...) and record them."""
    import gymnasium as gym

    env = gym.make(env_id, **(env_kwargs or {}))
    policy = make_expert(expert, env, seed=seed, **(expert_kwargs or {}))
    low, high = env.action_space.low, env.action_space.high
    obs_list, act_list, rew_list, ends = [], [], [], []
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=seed + ep)
        if hasattr(policy, "reset"):  # an expert with memory (a chunked policy) starts each episode afresh
            policy.reset()
        done = False
        while not done:
            action = np.clip(policy(env, obs), low, high).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            obs_list.append(obs)
            act_list.append(action)
            rew_list.append(reward)
            obs, done = next_obs, terminated or truncated
        ends.append(len(obs_list))
    env.close()
    return Demonstrations(np.array(obs_list), np.array(act_list), np.array(ends), np.array(rew_list), env_id)


def resolve_demonstrations(cfg, bc_dir: Path) -> Demonstrations:
    """The task's demonstrations: read ``demos.path``, or generate them with the scripted expert
    (cached as ``<bc_dir>/demos.npz``)."""
    d = cfg.demos
    if d.path is not None:
        try:
            return load_demonstrations(d.path, d.format, d.obs_keys)
        except FileNotFoundError as e:
            raise MissingFileError(
                f"{e}; the task file's header says how to get its demonstrations (Minari, D4RL or your own npz)"
            ) from e
        except (ValueError, ImportError, KeyError) as e:
            from flowrl.errors import ConfigError

            raise ConfigError(f"demos.path={d.path} (format {d.format}): {e}") from e
    cached = bc_dir / "demos.npz"
    if cached.is_file():
        return load_demonstrations(cached)
    demos = collect_demonstrations(
        cfg.env.id, d.expert, d.num_episodes, d.seed, cfg.env.kwargs, d.expert_kwargs
    )
    demos.save(cached)
    return demos
