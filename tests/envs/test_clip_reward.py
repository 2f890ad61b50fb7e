"""VLM-RM's CLIP reward on rendered MuJoCo frames, with a tiny random OpenCLIP (plumbing only)."""

import os

import numpy as np
import pytest
import torch

from flowrl.envs.clip_reward import CLIPRewardVectorEnv, VLMRewardModel
from flowrl.rewards.clip import preprocess


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These networks are tiny: one thread is fastest, and avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vlm_rm_reward_matches_its_definition():
    frames = np.random.default_rng(0).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8)
    plain = VLMRewardModel("flowrl-tiny", None, "a pole balanced upright", alpha=0.5)
    img = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        x = plain.clip.encode_image(preprocess(img, plain.image_size, plain.mean, plain.std)).float()
    x = x / x.norm(dim=-1, keepdim=True)
    # no baseline: P = I, and 1 - ||x - g||^2 / 2 is the cosine similarity
    np.testing.assert_allclose(plain(frames), (x @ plain.goal).numpy(), rtol=1e-5, atol=1e-5)
    reg = VLMRewardModel("flowrl-tiny", None, "a pole balanced upright", "a pole", alpha=0.7)
    d = reg.goal - VLMRewardModel("flowrl-tiny", None, "a pole").goal
    d = d / d.norm()
    r = x - reg.goal
    expected = 1 - 0.5 * ((0.7 * (r @ d)[:, None] * d + 0.3 * r) ** 2).sum(-1)
    np.testing.assert_allclose(reg(frames), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def renderer(monkeypatch):
    if "MUJOCO_GL" not in os.environ:
        monkeypatch.setenv("MUJOCO_GL", "egl")
    from flowrl.envs.rollouts import render_available

    if not render_available():
        pytest.skip("no headless MuJoCo renderer here (MUJOCO_GL=egl or osmesa)")


class CountingModel:
    """A VLMRewardModel that counts its forwards and keeps the frames it scored."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, frames):
        self.calls.append(frames.copy())
        return self.model(frames)


def test_clip_reward_batches_frames_and_keeps_both_terms(renderer):
    """Two pendulums, 4-action chunks, episodes capped at 6 steps: the second chunk of each env
    runs 2 steps and ends the episode. One CLIP forward per vector step scores all executed
    frames; the reward is env_weight * env + weight * CLIP, each term logged apart."""
    from flowrl.envs.clip_reward import RenderFrames
    from flowrl.envs.wrappers import make_vector_env

    model = CountingModel(VLMRewardModel("flowrl-tiny", None, "a pole balanced upright on a cart", "a cart"))
    vec = CLIPRewardVectorEnv(
        make_vector_env(
            2,
            env_id="InvertedPendulum-v5",
            obs_horizon=1,
            action_steps=4,
            max_episode_steps=6,
            render_mode="rgb_array",
            env_kwargs={"width": 32, "height": 32},
            inner_wrappers=(RenderFrames,),
        ),
        model,
        weight=2.0,
        env_weight=0.5,
    )
    vec.reset(seed=[0, 1])
    chunk = np.zeros((2, 4, 1), np.float32)
    _, reward, _, _, info = vec.step(chunk)
    assert len(model.calls) == 1 and model.calls[0].shape == (8, 32, 32, 3)  # 2 envs x 4 frames, one batch
    # the batched scores equal each env's frames scored on their own
    clip = np.array([model.model(model.calls[0][4 * n : 4 * n + 4]).sum() for n in range(2)])
    np.testing.assert_allclose(info["reward_clip"], clip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(info["reward_env"], [4.0, 4.0])
    np.testing.assert_allclose(reward, 0.5 * 4.0 + 2.0 * clip, rtol=1e-6)
    _, reward2, term, trunc, info = vec.step(chunk)
    assert len(model.calls) == 2 and model.calls[1].shape == (4, 32, 32, 3)  # the episodes end after 2 steps
    assert (trunc | term).all() and "frames" not in info["final_info"]
    final = info["final_info"]
    np.testing.assert_allclose(final["episode_return_env"], [6.0, 6.0])
    np.testing.assert_allclose(final["episode_return_clip"], clip + info["reward_clip"], rtol=1e-6)
    np.testing.assert_allclose(
        final["episode_return"], 0.5 * 6.0 + 2.0 * final["episode_return_clip"], rtol=1e-6
    )
    vec.close()
    with pytest.raises(ValueError, match="rgb_array"):
        import gymnasium as gym

        RenderFrames(gym.make("InvertedPendulum-v5"))


def test_training_logs_both_terms_and_evaluates_on_the_env_reward(renderer, tmp_path):
    """A run with the CLIP reward optimizes env + CLIP, logs the two apart, and evaluates (return,
    success) on the environment's reward alone: the same numbers as without CLIP."""
    from flowrl.config import load_config
    from flowrl.envs.rollouts import evaluate
    from flowrl.pretrain import bc_sampler, pretrain
    from flowrl.run import Run

    common = [
        f"train.output_dir={tmp_path}",
        "pretrain.steps=20",
        "pretrain.eval_episodes=0",
        "demos.num_episodes=2",
        "env.max_episode_steps=12",
        "env.eval_episodes=2",
    ]
    clip = [
        "clip_reward.enabled=true",
        "clip_reward.model=flowrl-tiny",
        "clip_reward.pretrained=null",
        "clip_reward.goal_prompt=a pole balanced upright",
        "clip_reward.render_size=32",
        "clip_reward.device=cpu",
        "clip_reward.weight=10",
    ]
    task = "robot_inverted_pendulum_reinflow"
    pretrain(load_config(task, common), task, progress=False)
    tiny = ["train.num_epochs=1", "env.n_steps=4", "env.num_envs=2", "train.minibatch_size=8"]
    rows = Run(load_config(task, [*common, *clip, *tiny]), task, progress=False).train()
    r = rows[1]
    assert r["train_return_env_mean"] > 0 and r["train_return_clip_mean"] != 0
    assert r["train_return_mean"] == pytest.approx(
        r["train_return_env_mean"] + 10 * r["train_return_clip_mean"]
    )
    from flowrl.models.policy import load_policy

    cfg_plain, cfg_clip = load_config(task, common), load_config(task, [*common, *clip])
    policy = load_policy(cfg_plain.bc_dir(task))
    plain = evaluate(policy, bc_sampler(cfg_plain, policy), cfg_plain, 2, 7)
    with_clip = evaluate(policy, bc_sampler(cfg_clip, policy), cfg_clip, 2, 7)
    assert with_clip["returns"] == plain["returns"] and with_clip["success_rate"] == plain["success_rate"]


def test_default_clip_weights_offline_error_names_the_fix(monkeypatch):
    """No network and no cached weights (the hub offline): the default ViT-B-32 "openai" weights
    are one flowrl error that says how to give local weights (OpenCLIP fails before building)."""
    from flowrl.config import load_config
    from flowrl.envs.clip_reward import shared_reward_model
    from flowrl.errors import MissingFileError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent/flowrl-test-hub")  # no cache to find them in
    cfg = load_config(
        "robot_inverted_pendulum_reinflow",
        ["clip_reward.enabled=true", "clip_reward.goal_prompt=a pole", "clip_reward.device=cpu"],
    )
    with pytest.raises(MissingFileError, match="clip_reward.pretrained=/path/to") as err:
        shared_reward_model(cfg.clip_reward)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_clip_reward_with_async_envs_equals_sync(renderer):
    """env.vectorization=async with rendering: the envs run in spawned processes (a forked EGL
    state hangs), CLIP in this one; the rewards and both return terms equal the sync envs'."""
    from flowrl.config import load_config
    from flowrl.envs.rollouts import task_vector_env

    clip = [
        "clip_reward.enabled=true",
        "clip_reward.model=flowrl-tiny",
        "clip_reward.pretrained=null",
        "clip_reward.goal_prompt=a pole balanced upright",
        "clip_reward.render_size=32",
        "clip_reward.device=cpu",
        "env.max_episode_steps=6",
    ]
    outs = []
    for mode in ("sync", "async"):
        vec = task_vector_env(
            load_config("robot_inverted_pendulum_reinflow", [*clip, f"env.vectorization={mode}"]), 2, True
        )
        vec.reset(seed=[0, 1])
        steps = [vec.step(np.zeros((2, 4, 1), np.float32)) for _ in range(2)]
        vec.close()
        outs.append(steps)
    for (_, ra, _, _, ia), (_, rb, _, _, ib) in zip(*outs):
        np.testing.assert_allclose(ra, rb, rtol=1e-6)
        np.testing.assert_allclose(ia["reward_clip"], ib["reward_clip"], rtol=1e-6)
    fa, fb = outs[0][1][4]["final_info"], outs[1][1][4]["final_info"]
    for key in ("episode_return", "episode_return_env", "episode_return_clip"):
        np.testing.assert_allclose(fa[key], fb[key], rtol=1e-6)
