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
    from flowrl.clip import load_open_clip, preprocess

    clip, tokenizer, size, mean, std = load_open_clip(clip_model, clip_pretrained, device)
    text_cache: dict[str, torch.Tensor] = {}

    def text_embeds(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in text_cache]
        if missing:
            with torch.no_grad():
                e = clip.encode_text(tokenizer(missing).to(device))
                e = e / e.norm(dim=-1, keepdim=True)
            text_cache.update(zip(missing, e))
        return torch.stack([text_cache[p] for p in prompts])

    def reward_fn(images, prompts, metadata):
        img = clip.encode_image(preprocess(images.to(device).float(), size, mean, std))
        img = img / img.norm(dim=-1, keepdim=True)
        return scale * (img * text_embeds(prompts)).sum(-1), {}

    return reward_fn
