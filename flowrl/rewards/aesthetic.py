"""LAION aesthetic predictor v2 (Schuhmann et al. 2022; used by DDPO as its aesthetic reward).

An MLP on L2-normalized OpenCLIP ViT-L/14 image embeddings predicts a 1-10 rating:

    768 -> 1024 -> (dropout) -> 128 -> (dropout) -> 64 -> (dropout) -> 16 -> 1

Weights: ``weights`` is a local file (the published ``sac+logos+ava1-l14-linearMSE.pth`` or a
safetensors conversion, keys ``layers.{0,2,4,6,7}.{weight,bias}``) or ``hf://<repo>/<file>`` to
fetch on a user's machine. ``weights: null`` leaves the MLP random: plumbing tests only.
Differentiable in the images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flowrl.errors import MissingFileError
from flowrl.rewards import register_reward


class AestheticMLP(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local safetensors/.pth file or ``hf://repo/file`` (safe loading only)."""
    if path.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        repo, _, filename = path[len("hf://") :].rpartition("/")
        path = hf_hub_download(repo, filename)
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"aesthetic weights {path!r} not found; give a local file, hf://repo/file, or null for random weights"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)


@register_reward("aesthetic", differentiable=True)
def aesthetic(
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | None = "openai",
    weights: str | None = None,
    device: str | torch.device = "cpu",
):
    from flowrl.rewards.clip import load_open_clip, preprocess

    clip, _, size, mean, std = load_open_clip(clip_model, clip_pretrained, device)
    dim = clip.visual.output_dim
    mlp = AestheticMLP(dim)
    if weights is not None:
        mlp.load_state_dict(load_weights(weights))
    mlp = mlp.to(device).eval().requires_grad_(False)

    def reward_fn(images, prompts, metadata):
        embed = clip.encode_image(preprocess(images.to(device).float(), size, mean, std))
        embed = embed / embed.norm(dim=-1, keepdim=True)
        return mlp(embed).squeeze(-1), {}

    return reward_fn
