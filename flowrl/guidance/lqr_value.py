"""The LQR value of an action chunk: a differentiable, infinite-horizon score for balancing tasks.

An env's own reward over one chunk is a myopic score. InvertedPendulum-v5 pays 1 per step alive,
so every candidate chunk that keeps the pole up for its 4 steps scores 4: the candidates tie and
best-of-N keeps the first, which is unguided sampling. The failure a weak policy shows there (the
cart drifting into the end of its rail after a few hundred steps) lies far beyond any chunk.

:class:`LQRValue` scores the chunk with the linearized dynamics about the upright state instead,

    x_0 = s (the last observation),  x_{i+1} = A x_i + B a_i + c                  (i < Ta)
    r(s, a_{0:Ta}) = -( sum_i x_i' Q x_i + a_i' R a_i  +  x_Ta' P x_Ta )

with (A, B) the discrete-time linearization of one env step about qpos = qvel = ctrl = 0 (central
differences of MuJoCo's step, :func:`flowrl.data.experts.linearize`), c = f(0, 0) the step from
that state (upright is not exactly at rest: InvertedPendulum's pole leans 1 mm in 0.6 m, so c
carries a pole acceleration of about 0.05 rad/s^2), and P the solution of the discrete Riccati
equation for (A, B, Q, R): x' P x is the optimal cost-to-go of the linear problem, so r is the
chunk's Q-value under an LQR continuation (a model-based value function, not the env's reward).
It is a polynomial of the actions, so it serves reward-gradient guidance as well as best-of-N and
SMC.
For MuJoCo envs whose observation is the full state (qpos, qvel), e.g. InvertedPendulum-v5, or
holds it (:data:`STATE_FROM_OBS`: InvertedDoublePendulum-v5's x, sin, cos, clipped velocities).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowrl.errors import ConfigError


def riccati(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, iters: int = 100000) -> np.ndarray:
    """P of the infinite-horizon discrete LQR: the fixed point of
    P <- Q + A'PA - A'PB (R + B'PB)^-1 B'PA (value iteration from P = Q)."""
    P = Q.copy()
    for _ in range(iters):
        K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P_next = Q + A.T @ P @ (A - B @ K)
        if np.abs(P_next - P).max() < 1e-10 * max(1.0, np.abs(P).max()):
            return P_next
        P = P_next
    raise ConfigError(
        "lqr_value: the Riccati iteration did not converge; the linearized system is not stabilizable"
    )


def _double_pendulum_state(obs: Tensor) -> Tensor:
    """InvertedDoublePendulum-v5's (x, sin q1, sin q2, cos q1, cos q2, qvel (3, clipped to +-10),
    a constraint force) -> (qpos, qvel)."""
    angles = torch.atan2(obs[..., 1:3], obs[..., 3:5])
    return torch.cat([obs[..., :1], angles, obs[..., 5:8]], dim=-1)


STATE_FROM_OBS = {"InvertedDoublePendulum": (9, _double_pendulum_state)}
"""Envs whose observation is not (qpos, qvel) but holds it: name prefix -> (obs dim, obs -> state)."""


def _step_from_zero(env) -> np.ndarray:
    """(qpos, qvel) one env step (frame_skip simulator steps) after qpos = qvel = ctrl = 0."""
    import mujoco

    u = env.unwrapped
    d = mujoco.MjData(u.model)
    for _ in range(u.frame_skip):
        mujoco.mj_step(u.model, d)
    return np.concatenate([d.qpos, d.qvel])


class LQRValue:
    """-(chunk cost + cost-to-go) of an action chunk under the env's linearization (see the module).

    Args:
        env_id: a MuJoCo gymnasium id whose observation is (qpos, qvel).
        q: the state cost's diagonal (nq + nv entries); default ``[1, 1, 0.1, 0.1]`` for a 4-state
            cart-pole (cart position and pole angle alike, velocities a tenth), else all ones.
        r: the action cost's weight (R = r I).
        env_kwargs: the env's keyword arguments.
    """

    differentiable = True

    def __init__(
        self, env_id: str, q: list[float] | None = None, r: float = 1.0, env_kwargs: dict | None = None
    ):
        import gymnasium as gym

        from flowrl.data.experts import linearize

        env = gym.make(env_id, **(env_kwargs or {}))
        u = env.unwrapped
        nq, nv = u.model.nq, u.model.nv
        self.state_from_obs = None
        mapped = next((v for k, v in STATE_FROM_OBS.items() if env_id.startswith(k)), None)
        if mapped is not None and env.observation_space.shape == (mapped[0],):
            self.state_from_obs = mapped[1]
        elif env.observation_space.shape != (nq + nv,):
            env.close()
            raise ConfigError(
                f"{env_id}: its observation is not the full state (qpos, qvel), so the LQR value cannot be "
                "computed from it; use a learned reward"
            )
        A, B = linearize(env)
        c = _step_from_zero(env)
        env.close()
        if q is None:
            q = [1.0, 1.0, 0.1, 0.1] if nq + nv == 4 else [1.0] * (nq + nv)
        if len(q) != nq + nv:
            raise ConfigError(f"lqr_value: q needs {nq + nv} weights (qpos, qvel), got {len(q)}")
        if r <= 0 or min(q) < 0:
            raise ConfigError(f"lqr_value: r must be > 0 and q >= 0, got r={r}, q={q}")
        Q, R = np.diag(np.asarray(q, dtype=np.float64)), r * np.eye(B.shape[1])
        self.A, self.B, self.c, self.Q, self.R, self.P = (
            torch.as_tensor(m, dtype=torch.float64) for m in (A, B, c, Q, R, riccati(A, B, Q, R))
        )

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        A, B, c, Q, R, P = (m.to(actions.device) for m in (self.A, self.B, self.c, self.Q, self.R, self.P))
        x = obs[:, -1].to(torch.float64)
        if self.state_from_obs is not None:
            x = self.state_from_obs(x)  # (B, nx)
        a = actions.to(torch.float64)  # (B, Ta, nu)
        cost = torch.zeros(len(x), dtype=torch.float64, device=actions.device)
        for i in range(a.shape[1]):
            cost = cost + ((x @ Q) * x).sum(-1) + ((a[:, i] @ R) * a[:, i]).sum(-1)
            x = x @ A.T + a[:, i] @ B.T + c
        cost = cost + ((x @ P) * x).sum(-1)
        return (-cost).to(actions.dtype)
