"""A CLIP reward on rendered frames (VLM-RM, Rocamonde et al. 2023, https://arxiv.org/abs/2310.12921).

    D  CLIP embedding width   B  frames

With x the unit-norm CLIP embedding of the rendered frame, g that of the goal prompt and b that
of a baseline prompt, VLM-RM's goal-baseline regularized reward is

    d = (g - b) / ||g - b||,   P = alpha * d d^T + (1 - alpha) * I
    R(frame) = 1 - 1/2 * ||P (x - g)||^2

alpha = 0 gives 1 - 1/2 ||x - g||^2 = cos(x, g), the plain CLIP similarity; alpha = 1 keeps only
the component along the direction from baseline to goal. Without a baseline prompt P = I.

The wrapper renders after every simulator step (``render_mode="rgb_array"``; on a headless
machine set ``MUJOCO_GL=egl``) and adds ``weight * R`` to ``env_weight`` times the env reward.
A real CLIP (ViT-B-32 or larger) belongs on a GPU; ``model="flowrl-tiny"`` with random weights
tests the plumbing.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from flowrl.rewards.clip import load_open_clip, preprocess


class VLMRewardModel:
    """R(frames) of VLM-RM for one goal (and optional baseline) prompt."""

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        goal_prompt: str,
        baseline_prompt: str = "",
        alpha: float = 0.5,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.clip, tokenizer, self.image_size, self.mean, self.std = load_open_clip(
            model, pretrained, self.device
        )
        with torch.no_grad():
            prompts = [goal_prompt] + ([baseline_prompt] if baseline_prompt else [])
            text = self.clip.encode_text(tokenizer(prompts).to(self.device)).float()
            text = text / text.norm(dim=-1, keepdim=True)  # (1 or 2, D)
        self.goal = text[0]  # (D,)
        eye = torch.eye(len(self.goal), device=self.device)
        if baseline_prompt:
            d = text[0] - text[1]
            d = d / d.norm()
            self.projection = alpha * torch.outer(d, d) + (1 - alpha) * eye  # (D, D)
        else:
            self.projection = eye

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 frames -> (B,) rewards."""
        images = (
            torch.as_tensor(np.ascontiguousarray(frames), device=self.device).permute(0, 3, 1, 2).float()
            / 255
        )
        x = self.clip.encode_image(preprocess(images, self.image_size, self.mean, self.std)).float()
        x = x / x.norm(dim=-1, keepdim=True)  # (B, D)
        residual = (x - self.goal) @ self.projection.T  # (B, D), P symmetric
        return (1 - 0.5 * (residual**2).sum(-1)).cpu().numpy()


class CLIPRewardWrapper(gym.Wrapper):
    """reward = env_weight * env reward + weight * R(rendered frame); both terms in ``info``."""

    def __init__(
        self, env: gym.Env, reward_model: VLMRewardModel, weight: float = 1.0, env_weight: float = 1.0
    ):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(
                "the CLIP reward needs render_mode='rgb_array' (set MUJOCO_GL=egl on a headless machine)"
            )
        self.reward_model, self.weight, self.env_weight = reward_model, weight, env_weight

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        clip_reward = float(self.reward_model(self.env.render()[None])[0])
        info = dict(info, reward_env=float(reward), reward_clip=clip_reward)
        return obs, self.env_weight * float(reward) + self.weight * clip_reward, terminated, truncated, info


def clip_reward_wrapper(cfg):
    """``env -> CLIPRewardWrapper`` for a :class:`~flowrl.robot.config.ClipRewardConfig`; the CLIP
    model is loaded once, on first use, and shared by the envs of this process."""
    shared: list[VLMRewardModel] = []

    def wrap(env: gym.Env) -> CLIPRewardWrapper:
        if not shared:
            device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            shared.append(
                VLMRewardModel(
                    cfg.model, cfg.pretrained, cfg.goal_prompt, cfg.baseline_prompt, cfg.alpha, device
                )
            )
        return CLIPRewardWrapper(env, shared[0], cfg.weight, cfg.env_weight)

    return wrap
