"""Rollouts around the methods: success from the env's own signal, async vector envs equal to
sync ones, rollout videos (one policy, and BC vs fine-tuned side by side) with the expected frame
counts, and flowrl pretrain's report of BC quality."""

import importlib.util
import json
import math
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

from flowrl.cli import main
from flowrl.config import load_config
from flowrl.envs.rollouts import evaluate, record_video, render_available
from flowrl.envs.wrappers import executed_steps, make_vector_env
from flowrl.errors import ConfigError
from flowrl.pretrain import bc_sampler, build_policy


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These networks are tiny; the CLI also sets torch's threads (train.torch_threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class SeedSuccessEnv(gym.Env):
    """Episodes of 6 steps, reward 1 per step; ``info["is_success"]`` is true at the last step
    when the reset seed is even (an env that judges success itself, as gymnasium-robotics do)."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.even = 0, seed is not None and seed % 2 == 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t >= 6
        return np.zeros(2, np.float32), 1.0, False, done, {"is_success": bool(done and self.even)}


def random_policy(cfg, obs_dim: int, action_dim: int, low, high):
    torch.manual_seed(0)
    policy = build_policy(cfg, obs_dim, action_dim)
    policy.normalizer.fit(torch.randn(64, obs_dim), torch.as_tensor(low), torch.as_tensor(high))
    return policy.eval()


def test_success_comes_from_the_env_signal_where_it_has_one():
    if "FlowrlSeedSuccess-v0" not in gym.envs.registry:
        gym.register("FlowrlSeedSuccess-v0", entry_point=SeedSuccessEnv)
    # env.success_return would call every episode (return 6) a failure: the env's own signal wins
    cfg = load_config(
        "robot_inverted_pendulum_reinflow", ["env.id=FlowrlSeedSuccess-v0", "env.success_return=100"]
    )
    policy = random_policy(cfg, 2, 1, -np.ones(1), np.ones(1))
    ev = evaluate(policy, bc_sampler(cfg, policy), cfg, 4, seed=10)  # seeds 10, 11, 12, 13
    assert ev["returns"] == [6.0] * 4 and ev["success_rate"] == 0.5 and ev["success_from"] == "env"
    # an env without a signal: the documented threshold
    cfg = load_config("robot_inverted_pendulum_reinflow", ["env.max_episode_steps=8"])
    policy = random_policy(cfg, 4, 1, -3 * np.ones(1), 3 * np.ones(1))
    ev = evaluate(policy, bc_sampler(cfg, policy), cfg, 2, seed=0)
    assert ev["success_from"] == "return >= 1000" and ev["success_rate"] == 0.0


def test_async_vector_envs_give_the_sync_results():
    kwargs = dict(env_id="InvertedPendulum-v5", obs_horizon=2, action_steps=3, max_episode_steps=10)
    rng = np.random.default_rng(0)
    sync, asyn = make_vector_env(3, "sync", **kwargs), make_vector_env(3, "async", **kwargs)
    assert isinstance(asyn, gym.vector.AsyncVectorEnv)
    a, b = sync.reset(seed=[1, 2, 3])[0], asyn.reset(seed=[1, 2, 3])[0]
    np.testing.assert_array_equal(a, b)
    for _ in range(6):  # two episode ends per env (same-step autoreset)
        chunk = rng.uniform(-3, 3, (3, 3, 1)).astype(np.float32)
        out_a, out_b = sync.step(chunk), asyn.step(chunk)
        for x, y in zip(out_a[:4], out_b[:4]):
            np.testing.assert_array_equal(x, y)
        ended = out_a[2] | out_a[3]
        np.testing.assert_array_equal(executed_steps(out_a[4], ended), executed_steps(out_b[4], ended))
        if ended.any():
            fa, fb = out_a[4]["final_info"], out_b[4]["final_info"]
            np.testing.assert_array_equal(fa["episode_return"][ended], fb["episode_return"][ended])
            np.testing.assert_array_equal(
                np.stack(out_a[4]["final_obs"][ended]), np.stack(out_b[4]["final_obs"][ended])
            )
    sync.close(), asyn.close()
    # the task's evaluation through env.vectorization=async: the same returns
    overrides = ["env.max_episode_steps=30"]
    cfg = load_config("robot_inverted_pendulum_reinflow", overrides)
    cfg_async = load_config("robot_inverted_pendulum_reinflow", [*overrides, "env.vectorization=async"])
    policy = random_policy(cfg, 4, 1, -3 * np.ones(1), 3 * np.ones(1))
    assert evaluate(policy, bc_sampler(cfg, policy), cfg, 3, 5) == evaluate(
        policy, bc_sampler(cfg_async, policy), cfg_async, 3, 5
    )
    with pytest.raises(ConfigError, match="vectorization"):
        load_config("robot_inverted_pendulum_reinflow", ["env.vectorization=threads"])


@pytest.fixture
def renderer(monkeypatch):
    if "MUJOCO_GL" not in os.environ:
        monkeypatch.setenv("MUJOCO_GL", "egl")
    if not render_available():
        pytest.skip("no headless MuJoCo renderer here (MUJOCO_GL=egl or osmesa)")


def test_record_video_writes_every_second_frame(renderer, tmp_path):
    cfg = load_config("robot_inverted_pendulum_reinflow", ["env.max_episode_steps=9"])
    policy = random_policy(cfg, 4, 1, -3 * np.ones(1), 3 * np.ones(1))
    n = record_video(policy, bc_sampler(cfg, policy), cfg, tmp_path / "v.gif", seed=0, size=32)
    length = evaluate(policy, bc_sampler(cfg, policy), cfg, 1, 0)["length_mean"]
    assert n == math.ceil((length + 1) / 2)  # the reset frame and one per simulator step, every second
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == n and gif.size == (32, 32)
    with pytest.raises(ConfigError, match=r"\.gif"):
        record_video(policy, bc_sampler(cfg, policy), cfg, tmp_path / "v.avi", seed=0, size=32)
    if importlib.util.find_spec("av") is None:  # without PyAV an .mp4 is one error naming the fix
        with pytest.raises(ConfigError, match="pip install imageio av"):
            record_video(policy, bc_sampler(cfg, policy), cfg, tmp_path / "v.mp4", seed=0, size=32)


def test_pretrain_reports_bc_quality_and_evaluate_video_is_side_by_side(renderer, tmp_path, capsys):
    task = "tasks/robot_inverted_pendulum_reinflow.yaml"
    common = [f"train.output_dir={tmp_path}", "env.max_episode_steps=8", "demos.num_episodes=2"]
    assert main(["pretrain", task, *common, "pretrain.steps=20", "pretrain.eval_episodes=2"]) == 0
    out = capsys.readouterr().out
    bc = tmp_path / "robot_inverted_pendulum_reinflow_bc"
    summary = json.loads((bc / "eval.json").read_text())
    assert f"expert (the 2 demonstrations): return {summary['demo_return_mean']:.1f}" in out
    assert f"{summary['eval_return_mean'] / summary['demo_return_mean']:.0%} of the expert's" in out
    assert len(summary["demo_returns"]) == 2 and (bc / "bc_quality.png").stat().st_size > 0
    # the BC policy against a "fine-tuned" one (here the same folder), one episode each, side by side
    video, result = tmp_path / "cmp.gif", tmp_path / "r.json"
    argv = ["evaluate", task, *common, "--policy", str(bc), "--episodes", "1", "--video", str(video)]
    assert main([*argv, "--out", str(result)]) == 0
    assert "video:" in capsys.readouterr().out
    length = json.loads(result.read_text())["length_mean"]
    gif = Image.open(video)
    assert gif.n_frames == math.ceil((length + 1) / 2) and gif.size == (2 * 256, 14 + 256)
    assert main(["evaluate", task, *common, "--video", str(tmp_path / "x.webp")]) == 2
    assert "unknown format '.webp'" in capsys.readouterr().err


def test_training_writes_a_video_at_every_evaluation(renderer, tmp_path):
    from flowrl.pretrain import pretrain
    from flowrl.run import Run

    task = "robot_inverted_pendulum_reinflow"
    common = [f"train.output_dir={tmp_path}", "env.max_episode_steps=6", "demos.num_episodes=2"]
    pretrain(
        load_config(task, [*common, "pretrain.steps=5", "pretrain.eval_episodes=0"]), task, progress=False
    )
    tiny = [
        "train.num_epochs=2",
        "train.eval_every=1",
        "env.n_steps=2",
        "env.num_envs=2",
        "env.eval_episodes=1",
    ]
    run = Run(
        load_config(task, [*common, *tiny, "env.video=true", "train.minibatch_size=4"]), task, progress=False
    )
    run.train()
    videos = sorted(p.name for p in (run.run_dir / "videos").iterdir())
    assert videos == [
        "epoch_0000.gif",
        "epoch_0001.gif",
        "epoch_0002.gif",
    ]  # the BC policy, then each evaluation
