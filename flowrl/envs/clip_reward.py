"""A CLIP reward on rendered frames (VLM-RM, Rocamonde et al. 2023, https://arxiv.org/abs/2310.12921).

    D  CLIP embedding width   B  frames

With x the unit-norm CLIP embedding of the rendered frame, g that of the goal prompt and b that
of a baseline prompt, VLM-RM's goal-baseline regularized reward is

    d = (g - b) / ||g - b||,   P = alpha * d d^T + (1 - alpha) * I
    R(frame) = 1 - 1/2 * ||P (x - g)||^2

alpha = 0 gives 1 - 1/2 ||x - g||^2 = cos(x, g), the plain CLIP similarity; alpha = 1 keeps only
the component along the direction from baseline to goal. Without a baseline prompt P = I.

Each env renders after every simulator step (:class:`RenderFrames`, ``render_mode="rgb_array"``;
on a headless machine set ``MUJOCO_GL=egl``); the vector wrapper :class:`CLIPRewardVectorEnv`
scores the frames of all N envs' chunks in one CLIP forward per vector step and adds
``weight * sum of R`` to ``env_weight`` times each chunk's env reward. The two terms stay apart in
what is logged: ``info["reward_env"]`` and ``info["reward_clip"]`` per chunk, and at an episode's
end ``episode_return_env`` and ``episode_return_clip`` beside the combined ``episode_return``.
Training optimizes the combined reward; evaluation and success use the environment's own
(:func:`flowrl.envs.rollouts.evaluate` runs without CLIP). A real CLIP (ViT-B-32 or larger) belongs
on a GPU; ``model="flowrl-tiny"`` with random weights tests the plumbing.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from flowrl.errors import FlowrlError, MissingFileError, one_line
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


class RenderFrames(gym.Wrapper):
    """Puts the frame rendered after every simulator step in ``info["frame"]`` (H, W, 3) uint8."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(
                "the CLIP reward needs render_mode='rgb_array' (set MUJOCO_GL=egl on a headless machine)"
            )

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, dict(info, frame=self.env.render())


class CLIPRewardVectorEnv(gym.vector.VectorWrapper):
    """reward = env_weight * env reward + weight * R summed over each chunk's rendered frames.

    Wraps N chunked envs whose inner envs are :class:`RenderFrames`-wrapped (the chunk wrapper
    hands on the chunk's frames as ``info["frames"]``); the frames of all N chunks, ended
    episodes' included, go through CLIP together, once per vector step."""

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        reward_model: VLMRewardModel,
        weight: float = 1.0,
        env_weight: float = 1.0,
    ):
        super().__init__(env)
        self.reward_model, self.weight, self.env_weight = reward_model, weight, env_weight
        self._clip_return = np.zeros(self.num_envs)

    def reset(self, **kwargs):
        self._clip_return[:] = 0
        return self.env.reset(**kwargs)

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        ended = terminated | truncated
        final = info.get("final_info", {})
        # with same-step autoreset an ended episode's last step info is in final_info
        frames = [(final if ended[n] else info)["frames"][n] for n in range(self.num_envs)]
        counts = [len(f) for f in frames]
        scores = self.reward_model(np.concatenate([np.stack(f) for f in frames if len(f)]))  # (sum counts,)
        clip = np.array([seg.sum() for seg in np.split(scores, np.cumsum(counts)[:-1])])  # (N,)
        self._clip_return += clip
        info = {k: v for k, v in info.items() if k not in ("frames", "_frames")}
        info.update(reward_env=np.asarray(reward, dtype=np.float64), reward_clip=clip)
        if ended.any():
            final = {k: v for k, v in final.items() if k not in ("frames", "_frames")}
            env_return = np.where(ended, final["episode_return"], 0.0)
            clip_return = np.where(ended, self._clip_return, 0.0)
            final.update(
                episode_return_env=env_return,
                episode_return_clip=clip_return,
                episode_return=self.env_weight * env_return + self.weight * clip_return,
            )
            info["final_info"] = final
            self._clip_return[ended] = 0
        return obs, self.env_weight * reward + self.weight * clip, terminated, truncated, info


_MODELS: dict[tuple, VLMRewardModel] = {}


def shared_reward_model(cfg) -> VLMRewardModel:
    """The :class:`VLMRewardModel` of a :class:`~flowrl.config.ClipRewardConfig`, loaded once per
    process and shared by its vector envs. Weights that cannot be had offline are one
    :class:`~flowrl.errors.MissingFileError` saying how to point at local weights."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    key = (cfg.model, cfg.pretrained, cfg.goal_prompt, cfg.baseline_prompt, cfg.alpha, device)
    if key not in _MODELS:
        try:
            _MODELS[key] = VLMRewardModel(*key)
        except FlowrlError:
            raise
        except Exception as e:  # the hub unreachable (offline), a tag OpenCLIP does not know, ...
            raise MissingFileError(
                f"clip_reward: the {cfg.pretrained!r} weights of {cfg.model} could not be loaded ({type(e).__name__}: "
                f"{one_line(str(e))[:200]}); offline, download them once elsewhere (open_clip.create_model("
                f"{cfg.model!r}, pretrained={cfg.pretrained!r})) or give a local file, clip_reward.pretrained="
                "/path/to/open_clip_pytorch_model.bin (HF_HUB_OFFLINE=1 uses the hub cache)"
            ) from None
    return _MODELS[key]
