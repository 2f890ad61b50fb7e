"""A trained flowrl policy as the demonstrator (``demos.expert: policy``), so any task can clone
demonstrations of a policy flowrl trained, e.g. a locomotion expert trained from scratch with
the Gaussian PPO baseline (``tasks/robot_hopper_gaussian_expert.yaml``), with nothing downloaded.

    demos:
      path: null
      expert: policy
      expert_kwargs: {path: runs/robot_hopper_gaussian_expert/checkpoints/epoch_000488,
                      deterministic: true, noise_std: 0.0}

``path`` is any policy folder :func:`~flowrl.models.policy.load_policy` reads, of any family: a
``flowrl pretrain`` folder or a training checkpoint. The chain that samples it is the one its
run used: the checkpoint's ``config.yaml``, else the task file ``task`` (the task that trained
it), else the family's default sampler. The expert acts as the policy acts in its env: it keeps
the last To observations (the first repeated at the episode start, as
:class:`~flowrl.envs.wrappers.ActionChunkWrapper`) and executes ``action_steps`` actions of each
chunk (default: the run's ``env.action_steps``) before it queries the policy again. Its noise
generator restarts at every episode from ``demos.seed`` + the episode's index, as evaluation's
does from its reset seed, so with ``deterministic: true`` and no ``noise_std`` every demonstrated
episode is the policy's evaluation episode from the same reset seed (its return included).

``deterministic: true`` follows the sampler's mean path (the policy's evaluation, so the
demonstrations have its evaluation return); ``false`` samples its exploration noise. Gaussian
``noise_std`` (env units) is added to every action, as the scripted experts do.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

from flowrl.errors import ConfigError, MissingFileError

# the method whose sampler a policy folder without a config is sampled by
FAMILY_METHOD = {"gaussian_policy": "gaussian_ppo", "flow_policy": "reinflow", "diffusion_policy": "dppo"}


def policy_config(folder: Path, family: str, task: str | None):
    """The task config whose sampler runs the policy (see the module docstring)."""
    import yaml

    from flowrl.config import from_dict, read_task

    own = folder / "config.yaml"
    if own.is_file():
        data = yaml.safe_load(own.read_text())
    elif task is not None:
        data = read_task(task)
    elif family in FAMILY_METHOD:
        data = {"kind": "env", "algorithm": {"name": FAMILY_METHOD[family]}, "model": {"family": family}}
    else:
        raise ConfigError(
            f"demos.expert_kwargs: {folder} holds a {family} policy and no config.yaml; give the task that "
            "trained it as demos.expert_kwargs.task=<task file>"
        )
    data = dict(data)
    # the demonstrator's own demonstrations are irrelevant here; a placeholder keeps validation quiet
    data["demos"] = {"expert": "policy", "expert_kwargs": {"path": str(folder)}}
    data.setdefault("train", {})
    data["train"] = {**data["train"], "device": "cpu", "resume": None}
    return from_dict(data)


class PolicyExpert:
    """Roll out a saved flowrl policy: ``expert(env, obs)`` -> one action in env units."""

    def __init__(
        self,
        env,
        path: str | None = None,
        deterministic: bool = True,
        noise_std: float = 0.0,
        action_steps: int | None = None,
        task: str | None = None,
        seed: int = 0,
    ):
        from flowrl.models.policy import load_policy
        from flowrl.samplers import sampler_for

        if path is None:
            raise ConfigError(
                "demos.expert=policy needs the policy folder: demos.expert_kwargs.path=<a flowrl pretrain "
                "folder or a checkpoint, e.g. runs/<task>/checkpoints/epoch_N>"
            )
        folder = Path(path).expanduser()
        if not (folder / "policy.json").is_file():
            raise MissingFileError(
                f"demos.expert_kwargs.path={path} holds no policy.json; give a policy folder (a flowrl pretrain "
                "folder or a training checkpoint, runs/<task>/checkpoints/epoch_N)"
            )
        self.policy = load_policy(folder, "cpu").eval()
        p = self.policy
        obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
        if (p.obs_dim, p.action_dim) != (obs_dim, action_dim):
            raise ConfigError(
                f"demos.expert_kwargs.path={path}: the policy takes observations of dim {p.obs_dim} and gives "
                f"actions of dim {p.action_dim}, but {env.spec.id if env.spec else 'the env'} has {obs_dim} and "
                f"{action_dim}; give a policy trained on this env"
            )
        cfg = policy_config(folder, p.family, task)
        self.sampler = sampler_for(cfg, p)
        steps = cfg.env.action_steps if action_steps is None else action_steps
        if not 1 <= steps <= p.action_horizon:
            raise ConfigError(
                f"demos.expert_kwargs.action_steps must be in 1..{p.action_horizon} (the policy's chunk), got {steps}"
            )
        self.action_steps, self.deterministic, self.noise_std = steps, deterministic, noise_std
        self.rng = np.random.default_rng(seed)
        self.seed, self.episodes = seed, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.history: deque = deque(maxlen=p.obs_horizon)
        self.queue: deque = deque()

    def reset(self) -> None:
        """A new episode: forget the observation history and the rest of the chunk; the sampler's
        noise restarts from seed + episode, so episode e (reset seed seed + e) is the rollout
        ``flowrl evaluate --seed <seed + e> --episodes 1`` makes."""
        self.history.clear()
        self.queue.clear()
        self.generator.manual_seed(self.seed + self.episodes)
        self.episodes += 1

    def __call__(self, env, obs: np.ndarray) -> np.ndarray:
        from flowrl.envs.rollouts import act

        obs = np.asarray(obs, dtype=np.float32)
        if not self.history:
            self.history.extend([obs] * self.history.maxlen)
        else:
            self.history.append(obs)
        if not self.queue:
            chunk, _ = act(
                self.policy,
                self.sampler,
                np.stack(self.history)[None],
                self.action_steps,
                self.generator,
                deterministic=self.deterministic,
            )
            self.queue.extend(chunk[0])  # (Te, Da) in env units
        action = self.queue.popleft().astype(np.float64)
        return action + self.noise_std * self.rng.normal(size=action.shape)
