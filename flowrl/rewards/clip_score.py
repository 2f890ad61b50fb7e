"""CLIP image-text score: cosine similarity of OpenCLIP image and prompt embeddings, times
``scale`` (CLIPScore, Hessel et al. 2021, uses 2.5 * max(cos, 0); the default here is the raw
cosine). Differentiable in the images.

``clip_model`` is an OpenCLIP architecture, ``clip_pretrained`` a tag (``"openai"``), a local
file, or null for random weights (plumbing tests).
"""

from __future__ import annotations

import torch

from flowrl.rewards import register_reward


@register_reward("clip_score", differentiable=True)
def clip_score(
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | None = "openai",
    scale: float = 1.0,
    device: str | torch.device = "cpu",
):
    from flowrl.rewards.clip import load_open_clip, similarity_reward

    clip, tokenizer, size, mean, std = load_open_clip(clip_model, clip_pretrained, device)
    return similarity_reward(clip, tokenizer, size, mean, std, device, scale)
