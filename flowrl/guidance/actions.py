"""Action rewards: guidance targets for robot policies, scored on a whole action chunk.

    B  chunks   To, Do  observation history   Ta, Da  action chunk (env units)

An action reward is ``reward(obs, actions) -> (B,)``: ``obs`` (B, To, Do) the observation history
in the env's units, ``actions`` (B, Ta, Da) the decoded chunk. A reward without gradients (a
simulator, a lookup) says so with ``differentiable = False``. :class:`ChunkReward` puts one behind
the ``(samples, inputs, metadata)`` signature the guidance methods score with, where the inputs
are the observation histories the policy was conditioned on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowrl.errors import ConfigError


class ChunkReward:
    """An action reward ``reward(obs, actions)`` as a guidance reward ``(actions, obs, metadata)``.

    Every call is guarded (:class:`flowrl.rewards.registry.guarded`): with a ``timeout`` it runs in
    a reward thread and may take at most that many seconds, and a raise, ``sys.exit()`` or
    ``KeyboardInterrupt`` inside the reward is a RewardError naming it (``name``)."""

    def __init__(
        self,
        reward,
        name: str | None = None,
        timeout: float | None = None,
        timeout_option: str = "reward_timeout",
    ):
        from flowrl.rewards.registry import guarded

        self.reward = reward
        self.differentiable = getattr(reward, "differentiable", True)
        name = name or getattr(reward, "__name__", None) or type(reward).__name__
        self.guard = guarded(name, timeout, timeout_option)

    def __call__(self, actions: Tensor, obs, metadata=None) -> Tensor:
        if isinstance(obs, (list, tuple)):
            obs = torch.stack([torch.as_tensor(o) for o in obs])
        obs = torch.as_tensor(obs).to(actions.device)
        return self.guard(self.reward, obs, actions, what=f"{len(actions)} action chunks")


def action_reward_factory(spec: str):
    """The factory of an action reward: a name of :data:`ACTION_REWARDS`, or a user's script
    ``file.py[:name]`` defining ``action_reward(obs, actions) -> (B,)`` or a factory
    ``make_action_reward(**kwargs)`` returning one (``:name`` picks another function)."""
    from pathlib import Path

    from flowrl.errors import MissingFileError
    from flowrl.rewards.registry import UnknownRewardError, _import_file

    if spec in ACTION_REWARDS:
        return ACTION_REWARDS[spec]
    path_part, _, attr = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    if not path_part.endswith(".py"):
        raise ConfigError(
            f"unknown action reward {spec!r}; give one of {sorted(ACTION_REWARDS)} or a script file.py "
            "defining action_reward(obs, actions)"
        )
    path = Path(path_part).expanduser()
    if not path.is_file():
        raise MissingFileError(f"action reward script {spec!r} not found (looked for {path.resolve()})")
    module = _import_file(path)  # sys.exit() or an error at import: a RewardError naming the script
    name = attr or next((n for n in ("make_action_reward", "action_reward") if hasattr(module, n)), None)
    fn = getattr(module, name, None) if name else None
    if not callable(fn):
        raise UnknownRewardError(
            f"action reward script {path} defines no {attr!r}"
            if attr
            else f"action reward script {path} defines neither action_reward(obs, actions) nor "
            "make_action_reward(**kwargs)"
        )
    if name.startswith("make_"):
        return fn

    def plain(**kwargs):
        if kwargs:
            raise ConfigError(
                f"{name} takes no options but got {sorted(kwargs)}; define make_action_reward(**kwargs)"
            )
        return fn

    return plain


def target_reward(target: list[float]):
    """-mean ||a - target||^2 over the chunk: pull every action toward ``target`` (env units)."""

    def reward(obs: Tensor, actions: Tensor) -> Tensor:
        goal = torch.as_tensor(target, dtype=actions.dtype, device=actions.device)
        return -((actions - goal) ** 2).sum(-1).mean(-1)

    return reward


def smoothness_reward():
    """-mean ||a_{i+1} - a_i||^2 over the chunk: penalize jerky chunks."""

    def reward(obs: Tensor, actions: Tensor) -> Tensor:
        return -(actions.diff(dim=1) ** 2).sum(-1).mean(-1)

    return reward


class SimulatedReturn:
    """The env's own return of the chunk, simulated from the state in the last observation: a
    one-chunk model-predictive lookahead (not differentiable). Only for MuJoCo envs whose
    observation is the full state (qpos, qvel), e.g. InvertedPendulum-v5. A termination inside
    the chunk costs ``termination_penalty``; ``state_cost`` (nq + nv weights q) subtracts the
    quadratic cost sum_i q_i s_i^2 of the state s the chunk ends in (an LQR-like shaping: a short
    lookahead's returns often tie)."""

    differentiable = False

    def __init__(
        self,
        env_id: str,
        termination_penalty: float = 0.0,
        state_cost: list[float] | None = None,
        env_kwargs: dict | None = None,
    ):
        import gymnasium as gym

        self.env = gym.make(env_id, **(env_kwargs or {})).unwrapped
        self.env.reset(seed=0)
        nq, nv = self.env.model.nq, self.env.model.nv
        if self.env.observation_space.shape != (nq + nv,):
            raise ConfigError(
                f"{env_id}: its observation is not the full state (qpos, qvel), so a chunk cannot be "
                "simulated from it; use a learned reward"
            )
        if state_cost is not None and len(state_cost) != nq + nv:
            raise ConfigError(f"state_cost needs {nq + nv} weights (qpos, qvel), got {len(state_cost)}")
        self.nq, self.penalty = nq, termination_penalty
        self.state_cost = None if state_cost is None else np.asarray(state_cost, dtype=np.float64)

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        state, acts = obs[:, -1].double().cpu().numpy(), actions.double().cpu().numpy()
        out = torch.zeros(len(state))
        for i in range(len(state)):
            self.env.set_state(state[i, : self.nq], state[i, self.nq :])
            for a in acts[i]:
                _, r, terminated, _, _ = self.env.step(a)
                out[i] += float(r)
                if terminated:
                    out[i] -= self.penalty
                    break
            if self.state_cost is not None:
                s = np.concatenate([self.env.data.qpos, self.env.data.qvel])
                out[i] -= float((self.state_cost * s**2).sum())
        return out.to(actions.device)


from flowrl.guidance.lqr_value import LQRValue  # noqa: E402  (it needs nothing from this module)

ACTION_REWARDS = {
    "target": target_reward,
    "smoothness": smoothness_reward,
    "simulated_return": SimulatedReturn,
    "lqr_value": LQRValue,
}
