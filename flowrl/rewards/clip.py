"""OpenCLIP loading and differentiable preprocessing, shared by the CLIP-based rewards.

``model`` is an OpenCLIP architecture name (``"ViT-L-14"``) and ``pretrained`` a tag
(``"openai"``, fetched from the hub on a user's machine), a local weights file, or None for
random weights (to test the plumbing offline). ``"flowrl-tiny"`` is a 2-layer CLIP of a few
hundred thousand parameters for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.errors import ConfigError, MissingFileError

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def load_open_clip(
    model: str = "ViT-L-14", pretrained: str | None = "openai", device: str | torch.device = "cpu"
):
    """(model, tokenizer, image_size, mean, std) for an OpenCLIP architecture, eval mode, frozen."""
    import open_clip

    if pretrained is not None and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).expanduser().is_file():
            raise MissingFileError(
                f"CLIP weights file {pretrained!r} does not exist; give a local file, a tag like 'openai', or null"
            )
    if model == "flowrl-tiny":
        from open_clip.model import CLIP

        torch.manual_seed(0)
        net = CLIP(**TINY_CLIP_CONFIG)
        if pretrained is not None:
            raise ConfigError("flowrl-tiny is a random test model; set pretrained to null")
        image_size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    else:
        net = open_clip.create_model(model, pretrained=pretrained)
        image_size = net.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    net = net.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-L-14" if model == "flowrl-tiny" else model)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    return net, tokenizer, image_size, mean, std


def preprocess(images: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """Differentiable CLIP preprocessing of (B, 3, H, W) images in [0, 1]: bicubic resize of the
    short side and center crop to ``image_size``, then normalization."""
    h, w = images.shape[-2:]
    scale = image_size / min(h, w)
    if scale != 1:
        images = F.interpolate(
            images, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False
        )
    h, w = images.shape[-2:]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    images = images[..., top : top + image_size, left : left + image_size]
    return (images - mean.to(images.dtype)) / std.to(images.dtype)


def similarity_reward(
    clip, tokenizer, image_size: int, mean: Tensor, std: Tensor, device, scale: float = 1.0
):
    """A reward function ``scale * cos(image embedding, prompt embedding)`` for an OpenCLIP model;
    prompt embeddings are cached. Differentiable in the images."""
    text_cache: dict[str, Tensor] = {}

    def text_embeds(prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in text_cache]
        if missing:
            with torch.no_grad():
                e = clip.encode_text(tokenizer(missing).to(device))
                e = e / e.norm(dim=-1, keepdim=True)
            text_cache.update(zip(missing, e))
        return torch.stack([text_cache[p] for p in prompts])

    def reward_fn(images, prompts, metadata):
        img = clip.encode_image(preprocess(images.to(device).float(), image_size, mean, std))
        img = img / img.norm(dim=-1, keepdim=True)
        return scale * (img * text_embeds(prompts)).sum(-1), {}

    return reward_fn
