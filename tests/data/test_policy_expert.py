"""demos.expert=policy: a trained flowrl policy folder as the demonstrator (issue 17), and the
locomotion task files that train such an expert and clone it.

The demonstrator's episodes are checked against an independent rollout of the same policy:
flowrl's own deterministic evaluation (``flowrl.envs.rollouts.evaluate``, through the chunked
env wrapper) from the same reset seeds must give the same returns, episode by episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrl.config import load_config
from flowrl.data.experts import collect_demonstrations
from flowrl.envs.rollouts import evaluate
from flowrl.errors import ConfigError, MissingFileError
from flowrl.models.policy import load_policy
from flowrl.pretrain import bc_sampler, pretrain
from flowrl.samplers import sampler_for

SEED = 7


@pytest.fixture(scope="module")
def bc_folders(tmp_path_factory):
    """Two small BC policies on InvertedPendulum (a Gaussian MLP, a flow policy), each cloned for
    60 steps from two LQR episodes: weak policies (any policy will do for these tests)."""
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for name, task in (
        ("gaussian", "robot_inverted_pendulum_gaussian"),
        ("flow", "robot_inverted_pendulum_reinflow"),
    ):
        cfg = load_config(
            task,
            [
                f"pretrain.output_dir={root / name}",
                "pretrain.steps=60",
                "pretrain.batch_size=64",
                "model.hidden_dims=[32,32]",
                "demos.num_episodes=2",
                "pretrain.eval_episodes=0",
                "train.device=cpu",
            ],
        )
        pretrain(cfg, task, progress=False)
        out[name] = (root / name, cfg, task)
    return out


def _policy_returns(folder, cfg, episodes: int) -> list[float]:
    """The policy's deterministic return from reset seeds SEED, SEED+1, ..., one episode at a time
    (batch 1, as the demonstrator acts)."""
    policy = load_policy(folder)
    sampler = bc_sampler(cfg, policy) if policy.family == "diffusion_policy" else sampler_for(cfg, policy)
    return [evaluate(policy, sampler, cfg, 1, SEED + e)["returns"][0] for e in range(episodes)]


def test_demonstrations_have_the_policys_return(bc_folders):
    """Both families, deterministic, no noise: each demonstrated episode's return equals the
    policy's own evaluation from that reset seed (the Gaussian folder has no config: its family's
    sampler; the flow folder is sampled by the task named in expert_kwargs.task)."""
    for name, (folder, cfg, task) in bc_folders.items():
        kwargs = {"path": str(folder), "deterministic": True}
        if name == "flow":
            kwargs["task"] = task
        demos = collect_demonstrations("InvertedPendulum-v5", "policy", 3, SEED, expert_kwargs=kwargs)
        returns = demos.episode_returns()
        assert np.allclose(returns, _policy_returns(folder, cfg, 3)), (name, returns)


def test_noise_and_stochastic_sampling_change_the_actions(bc_folders):
    folder, _, _ = bc_folders["gaussian"]
    base = collect_demonstrations(
        "InvertedPendulum-v5", "policy", 1, SEED, expert_kwargs={"path": str(folder)}
    )
    noisy = collect_demonstrations(
        "InvertedPendulum-v5", "policy", 1, SEED, expert_kwargs={"path": str(folder), "noise_std": 0.1}
    )
    sampled = collect_demonstrations(
        "InvertedPendulum-v5", "policy", 1, SEED, expert_kwargs={"path": str(folder), "deterministic": False}
    )
    n = min(len(base.actions), len(noisy.actions), len(sampled.actions))
    assert np.allclose(base.observations[0], noisy.observations[0])  # the same start
    for other in (noisy, sampled):
        assert not np.allclose(base.actions[:n], other.actions[:n])
    # the first action is the policy's mean chunk's first action (+ noise): chunk starts are queried
    policy = load_policy(folder)
    with torch.no_grad():
        mu = policy.decode(policy(None, None, policy.condition(base.observations[:1, None])))
    assert np.allclose(base.actions[0], mu[0, 0].numpy(), atol=1e-6)


def test_bad_expert_folders(bc_folders, tmp_path):
    import gymnasium as gym

    from flowrl.data.policy_expert import PolicyExpert

    env = gym.make("InvertedPendulum-v5")
    with pytest.raises(ConfigError, match="expert_kwargs.path"):
        PolicyExpert(env)
    with pytest.raises(MissingFileError, match="policy.json"):
        PolicyExpert(env, path=str(tmp_path))
    folder = str(bc_folders["gaussian"][0])
    with pytest.raises(ConfigError, match="action_steps"):
        PolicyExpert(env, path=folder, action_steps=9)
    env.close()
    reacher = gym.make("Reacher-v5")
    with pytest.raises(ConfigError, match="trained on this env"):
        PolicyExpert(reacher, path=folder)
    reacher.close()


LOCOMOTION_EXPERTS = {
    "robot_hopper_gaussian_expert": "Hopper-v5",
    "robot_walker2d_gaussian_expert": "Walker2d-v5",
    "robot_halfcheetah_gaussian_expert": "HalfCheetah-v5",
}
CLONERS = {
    "robot_hopper_dppo": "robot_hopper_gaussian_expert",
    "robot_walker2d_reinflow": "robot_walker2d_gaussian_expert",
    "robot_halfcheetah_reinflow": "robot_halfcheetah_gaussian_expert",
}


def test_locomotion_task_files_load():
    """The expert tasks validate as PPO from scratch with CleanRL's recipe, and each fine-tuning
    task takes the no-download override its header documents (demos from the expert's checkpoint)."""
    for task, env_id in LOCOMOTION_EXPERTS.items():
        cfg = load_config(task)
        assert (cfg.env.id, cfg.model.pretrained, cfg.algorithm.name) == (env_id, "scratch", "gaussian_ppo")
        assert cfg.env.num_envs * cfg.env.n_steps * cfg.env.action_steps == 2048
        assert (cfg.train.update_epochs, cfg.train.minibatch_size, cfg.algorithm.clip_range) == (10, 64, 0.2)
        assert (cfg.optim.learning_rate, cfg.algorithm.gamma, cfg.algorithm.gae_lambda) == (3e-4, 0.99, 0.95)
        assert cfg.sampler.logprob_reduction == "sum" and cfg.sampler.logprob_clip is None
    for task, expert in CLONERS.items():
        path = f"runs/{expert}/checkpoints/epoch_000488"
        cfg = load_config(
            task, ["demos.path=null", "demos.expert=policy", f"demos.expert_kwargs.path={path}"]
        )
        assert cfg.demos.path is None and cfg.demos.expert == "policy"
        assert cfg.demos.expert_kwargs == {"path": path}
        assert cfg.env.id == LOCOMOTION_EXPERTS[expert]


def test_hopper_expert_from_scratch_demonstrates_from_its_checkpoint(tmp_path):
    """The Hopper expert task runs from scratch with no demonstrations (one tiny iteration here),
    and its checkpoint folder demonstrates through the sampler of the run's own config.yaml: the
    demonstrations have the checkpoint's evaluation returns from the same reset seeds."""
    from flowrl.run import Run

    task = "robot_hopper_gaussian_expert"
    tiny = ["env.num_envs=2", "env.n_steps=16", "env.eval_episodes=1", "train.num_epochs=1"]
    tiny += ["train.eval_every=0", "train.save_every=1", "train.minibatch_size=16", "train.device=cpu"]
    cfg = load_config(task, [f"train.output_dir={tmp_path}", *tiny])
    assert cfg.demos.path is None and cfg.demos.expert is None  # nothing to download or script
    run = Run(cfg, task, progress=False)
    run.train()
    folder = run.run_dir / "checkpoints" / "epoch_000001"
    assert (folder / "config.yaml").is_file()
    demos = collect_demonstrations("Hopper-v5", "policy", 2, SEED, expert_kwargs={"path": str(folder)})
    assert np.allclose(demos.episode_returns(), _policy_returns(folder, cfg, 2))
