"""JPEG compressibility and incompressibility (DDPO, Black et al. 2023, section 6.1).

The reward is the size of the image encoded as JPEG at quality 95, in kilobytes: negated for
compressibility (smaller files, i.e. smoother, flatter images score higher), as is for
incompressibility. Not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from flowrl.rewards import register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(B,) JPEG file size in kB of (B, 3, H, W) images in [0, 1]."""
    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    def reward_fn(images, prompts, metadata):
        return -jpeg_size_kb(images, quality), {}

    return reward_fn


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    def reward_fn(images, prompts, metadata):
        return jpeg_size_kb(images, quality), {}

    return reward_fn
