"""Demonstrations: flowrl's file format, readers for community formats, and BC training windows.

flowrl's format is one ``.npz`` file (``numpy.savez``) holding the episodes back to back:

    observations   (N, Do) float32   the observation each action was taken from
    actions        (N, Da) float32   the action taken, in the environment's units
    episode_ends   (E,)    int64     exclusive end of each episode in the flat arrays, increasing;
                                     episode e is rows [episode_ends[e-1], episode_ends[e]) (the first
                                     starts at 0), as in diffusion_policy's replay buffer
    rewards        (N,)    float32   optional, the reward of each step (for statistics only)
    env_id         ()      str       optional, the gymnasium id the episodes come from

The same arrays can come from an HDF5 file (``h5py`` needed, ``pip install h5py``):

- ``d4rl``: D4RL-style flat datasets (``observations``, ``actions``, ``terminals``, ``timeouts``;
  an episode ends at a terminal or a timeout), e.g. ``hopper-medium-v2.hdf5``.
- ``robomimic``: ``data/demo_<i>/obs/<key>`` and ``data/demo_<i>/actions``; low-dimensional
  observation keys are concatenated in sorted order unless ``obs_keys`` is given.
- ``minari``: a Minari dataset's ``main_data.hdf5`` (``episode_<i>/observations`` with one more
  row than ``actions``; the last observation is dropped). Pass the file or the dataset folder.

Windows for behavior cloning (diffusion-policy convention): for every step i of an episode, the
observations i-To+1 .. i (the first repeated before the episode start) and the actions
i .. i+Ta-1 (the last repeated after the episode end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowrl.errors import InputError, MissingFileError

FORMATS = ("npz", "d4rl", "robomimic", "minari")


@dataclass
class Demonstrations:
    """Episodes back to back; see the module docstring for the fields."""

    observations: np.ndarray
    actions: np.ndarray
    episode_ends: np.ndarray
    rewards: np.ndarray | None = None
    env_id: str = ""

    def __post_init__(self):
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.episode_ends = np.asarray(self.episode_ends, dtype=np.int64)
        n = len(self.observations)
        if self.observations.ndim != 2 or self.actions.ndim != 2:
            raise InputError(
                f"demonstrations: observations and actions must be (N, D) arrays, got {self.observations.shape} "
                f"and {self.actions.shape}; store the episodes back to back, one row per step "
                "(flatten image or dict observations into vectors first)"
            )
        if len(self.actions) != n:
            raise InputError(
                f"demonstrations: {n} observations but {len(self.actions)} actions; store one observation per "
                "action (drop each episode's final observation)"
            )
        ends = self.episode_ends
        if len(ends) == 0 or ends[-1] != n or (np.diff(ends) <= 0).any() or ends[0] <= 0:
            raise InputError(
                f"demonstrations: episode_ends must increase strictly and end at N={n}, got {ends[:5]}...{ends[-3:]}; "
                "give each episode's end index (exclusive), e.g. np.cumsum(episode_lengths)"
            )
        if not (np.isfinite(self.observations).all() and np.isfinite(self.actions).all()):
            raise InputError(
                "demonstrations: observations or actions contain NaN or inf; drop or repair those episodes"
            )

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def episode_returns(self) -> np.ndarray | None:
        if self.rewards is None:
            return None
        return np.add.reduceat(self.rewards, np.concatenate([[0], self.episode_ends[:-1]]))

    def save(self, path: str | os.PathLike) -> None:
        """Write flowrl's ``.npz`` format (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(observations=self.observations, actions=self.actions, episode_ends=self.episode_ends)
        if self.rewards is not None:
            arrays["rewards"] = np.asarray(self.rewards, dtype=np.float32)
        arrays["env_id"] = np.array(self.env_id)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def windows(self, obs_horizon: int, action_horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """BC training pairs: (M, To, Do) observation histories and (M, Ta, Da) action chunks, one per step."""
        starts = np.concatenate([[0], self.episode_ends[:-1]])
        obs_idx, act_idx = [], []
        for s, e in zip(starts, self.episode_ends):
            i = np.arange(s, e)[:, None]
            obs_idx.append(np.clip(i - obs_horizon + 1 + np.arange(obs_horizon), s, e - 1))
            act_idx.append(np.clip(i + np.arange(action_horizon), s, e - 1))
        return self.observations[np.concatenate(obs_idx)], self.actions[np.concatenate(act_idx)]


def load_demonstrations(
    path: str | os.PathLike, format: str = "npz", obs_keys: list[str] | None = None
) -> Demonstrations:
    """Read demonstrations in one of :data:`FORMATS` (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"demonstrations file {path} does not exist; fix demos.path, or set demos.path=null and "
            "demos.expert to generate demonstrations"
        )
    if format == "npz":
        with np.load(path, allow_pickle=False) as f:
            missing = {"observations", "actions", "episode_ends"} - set(f.files)
            if missing:
                raise InputError(
                    f"{path}: missing arrays {sorted(missing)}; save observations (N, Do), actions (N, Da) and "
                    "episode_ends (E,) with Demonstrations(...).save(path) (flowrl's npz format, see flowrl.data.demos)"
                )
            return Demonstrations(
                f["observations"],
                f["actions"],
                f["episode_ends"],
                f["rewards"] if "rewards" in f.files else None,
                str(f["env_id"]) if "env_id" in f.files else "",
            )
    if format not in FORMATS:
        raise InputError(f"demos.format must be one of {FORMATS}, got {format!r}")
    try:
        import h5py
    except ImportError as e:
        raise ImportError(f"reading {format} demonstrations needs h5py: pip install h5py") from e
    if format == "d4rl":
        with h5py.File(path, "r") as f:
            ends = np.flatnonzero(np.asarray(f["terminals"], bool) | np.asarray(f["timeouts"], bool)) + 1
            n = len(f["observations"])
            if len(ends) == 0 or ends[-1] != n:  # a last, unfinished episode still counts
                ends = np.append(ends, n)
            rewards = np.asarray(f["rewards"]) if "rewards" in f else None
            return Demonstrations(np.asarray(f["observations"]), np.asarray(f["actions"]), ends, rewards)
    if format == "robomimic":
        with h5py.File(path, "r") as f:
            names = sorted(f["data"], key=lambda k: int(k.split("_")[-1]))
            obs, acts, rews = [], [], []
            for name in names:
                demo = f["data"][name]
                keys = obs_keys or sorted(demo["obs"])
                obs.append(
                    np.concatenate(
                        [np.asarray(demo["obs"][k]).reshape(len(demo["actions"]), -1) for k in keys], 1
                    )
                )
                acts.append(np.asarray(demo["actions"]))
                rews.append(np.asarray(demo["rewards"]) if "rewards" in demo else np.zeros(len(acts[-1])))
            return Demonstrations(
                np.concatenate(obs),
                np.concatenate(acts),
                np.cumsum([len(a) for a in acts]),
                np.concatenate(rews),
            )
    # minari
    if path.is_dir():
        found = sorted(path.rglob("main_data.hdf5"))
        if not found:
            raise MissingFileError(f"{path}: no main_data.hdf5 below this Minari dataset folder")
        path = found[0]
    with h5py.File(path, "r") as f:
        names = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[-1]))
        obs, acts, rews = [], [], []
        for name in names:
            ep = f[name]
            a = np.asarray(ep["actions"])
            obs.append(np.asarray(ep["observations"])[: len(a)])
            acts.append(a)
            rews.append(np.asarray(ep["rewards"]))
        return Demonstrations(
            np.concatenate(obs), np.concatenate(acts), np.cumsum([len(a) for a in acts]), np.concatenate(rews)
        )
