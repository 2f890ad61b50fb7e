"""Running normalization of observations and rewards for PPO on raw MuJoCo tasks (issue 17).

    N  environments   To  observation history   Do  observation dim   S  steps per rollout

The standard PPO-MuJoCo recipe (CleanRL's ``ppo_continuous_action.py``, Stable-Baselines3's
``VecNormalize``) wraps the env in gymnasium's ``NormalizeObservation`` and ``NormalizeReward``;
without them PPO from scratch on Hopper learns far more slowly. flowrl's versions:

- :class:`RunningMeanStd`: the mean and variance of a stream of (B, D) batches, each merged with
  Chan et al.'s parallel update of Welford's moments (gymnasium's ``RunningMeanStd``: mean 0,
  var 1, count 1e-4 at the start):

      delta = mean_b - mean,   n' = n + n_b,   mean' = mean + delta n_b / n'
      var'  = (var n + var_b n_b + delta^2 n n_b / n') / n'

  so after any sequence of batches (mean, var) is the whole sample's (up to the 1e-4 prior).
- :class:`ObservationNormalizer` (``env.normalize_obs``): before every observation reaches the
  policy in a training rollout, its newest frame (N, Do) updates the statistics, which are written
  into the policy's own :class:`~flowrl.models.policy.Normalizer` (obs_mean = mean, obs_std =
  sqrt(var + 1e-8); the normalizer clips z-scores at +-10, as CleanRL's TransformObservation).
  The policy then normalizes as ``NormalizeObservation`` does: update with the observation, then
  normalize it. Evaluation, ``flowrl evaluate`` and ``demos.expert: policy`` only read the
  normalizer, so the statistics are frozen there, and a checkpoint's policy folder carries them.
- :class:`RewardScaler` (``algorithm.reward_scaling``): rewards divided by the running std of the
  discounted return (``NormalizeReward``; DPPO's and ReinFlow's ``reward_scale_running``).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class RunningMeanStd:
    """Mean and variance (float64, shape ``shape``) of every row seen by :meth:`update`."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, batch: np.ndarray) -> None:
        """Merge a (B, *shape) batch (Chan et al.'s parallel update, see the module docstring)."""
        batch = np.asarray(batch, np.float64).reshape(-1, *self.mean.shape)
        b_mean, b_var, b_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total

    def state_dict(self) -> dict:
        """JSON-safe (lists of float64, exact through ``json``'s repr)."""
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = np.asarray(state["mean"], np.float64).reshape(self.mean.shape)
        self.var = np.asarray(state["var"], np.float64).reshape(self.var.shape)
        self.count = float(state["count"])


class ObservationNormalizer:
    """gymnasium's ``NormalizeObservation`` written into a policy's normalizer (module docstring).

    Args:
        normalizer: the policy's :class:`~flowrl.models.policy.Normalizer` (its obs_mean and
            obs_std buffers are overwritten after every update).
        gather: ``tensor -> tensor`` concatenating a batch across processes (``accelerator.gather``),
            so every rank merges the same rows and the ranks' policies stay identical; None: one process.
    """

    EPSILON = 1e-8  # gymnasium's: std = sqrt(var + epsilon)

    def __init__(self, normalizer, gather=None):
        self.normalizer, self.gather = normalizer, gather
        self.rms = RunningMeanStd(tuple(normalizer.obs_mean.shape))

    def update(self, obs: np.ndarray) -> None:
        """(N, To, Do) observation histories in env units: merge their newest frames (N, Do)."""
        newest = np.asarray(obs)[:, -1]
        if self.gather is not None:
            newest = self.gather(torch.as_tensor(newest, dtype=torch.float64)).cpu().numpy()
        self.rms.update(newest)
        self._write()

    def _write(self) -> None:
        n = self.normalizer
        n.obs_mean.copy_(torch.as_tensor(self.rms.mean, dtype=torch.float32))
        n.obs_std.copy_(torch.as_tensor(np.sqrt(self.rms.var + self.EPSILON), dtype=torch.float32))

    def state_dict(self) -> dict:
        return self.rms.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state)
        self._write()


class RewardScaler:
    """Divides rewards by the running std of the discounted return (PPO's reward scaling, as
    gymnasium's ``NormalizeReward`` and DPPO's and ReinFlow's ``reward_scale_running``); its
    statistics are part of the training state."""

    def __init__(self, gamma: float):
        self.gamma = gamma
        self.rms = RunningMeanStd(())

    @property
    def var(self) -> float:
        return float(self.rms.var)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """(S, N) rewards and episode ends in time order -> scaled rewards; updates the statistics
        with the S * N discounted returns R_t = gamma R_{t-1} (1 - done_{t-1}) + r_t."""
        ret = np.zeros(rewards.shape[1])
        returns = np.empty_like(rewards)
        for t in range(len(rewards)):
            ret = ret * self.gamma + rewards[t]
            returns[t] = ret
            ret = ret * (1 - dones[t])
        self.rms.update(returns.reshape(-1))
        return rewards / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": float(self.rms.mean), "var": float(self.rms.var), "count": self.rms.count}

    def load_state_dict(self, state: dict) -> None:
        self.rms.load_state_dict(state)
