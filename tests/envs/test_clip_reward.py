"""VLM-RM's CLIP reward on rendered MuJoCo frames, with a tiny random OpenCLIP (plumbing only)."""

import os

import numpy as np
import pytest
import torch

from flowrl.envs.clip_reward import CLIPRewardWrapper, VLMRewardModel
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


def test_clip_reward_wrapper_on_rendered_frames(monkeypatch):
    if "MUJOCO_GL" not in os.environ:
        monkeypatch.setenv("MUJOCO_GL", "egl")
    from flowrl.envs.rollouts import render_available

    if not render_available():
        pytest.skip("no headless MuJoCo renderer here (MUJOCO_GL=egl or osmesa)")
    import gymnasium as gym

    model = VLMRewardModel("flowrl-tiny", None, "a pole balanced upright on a cart", "a cart")
    env = CLIPRewardWrapper(
        gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=32, height=32),
        model,
        weight=2.0,
        env_weight=0.5,
    )
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(1, np.float32))
    assert info["reward_env"] == 1.0
    assert reward == pytest.approx(0.5 * 1.0 + 2.0 * info["reward_clip"])
    assert info["reward_clip"] == pytest.approx(float(model(env.render()[None])[0]), abs=1e-6)
    with pytest.raises(ValueError, match="rgb_array"):
        CLIPRewardWrapper(gym.make("InvertedPendulum-v5"), model)


def test_task_config_turns_the_clip_reward_on(monkeypatch):
    if "MUJOCO_GL" not in os.environ:
        monkeypatch.setenv("MUJOCO_GL", "egl")
    from flowrl.config import load_config
    from flowrl.envs.rollouts import env_kwargs, render_available
    from flowrl.envs.wrappers import make_env

    if not render_available():
        pytest.skip("no headless MuJoCo renderer here (MUJOCO_GL=egl or osmesa)")
    cfg = load_config(
        "robot_inverted_pendulum_reinflow",
        [
            "clip_reward.enabled=true",
            "clip_reward.model=flowrl-tiny",
            "clip_reward.pretrained=null",
            "clip_reward.goal_prompt=a pole balanced upright",
            "clip_reward.render_size=32",
        ],
    )
    env = make_env(**env_kwargs(cfg))
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros((4, 1), np.float32))
    assert "reward_clip" in info and info["chunk_steps"] == 4
    assert env.unwrapped.render_mode == "rgb_array"
