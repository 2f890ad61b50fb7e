"""Human-preference rewards.

- ``pickscore`` (Kirstain et al. 2023, https://arxiv.org/abs/2305.01569): a CLIP-H fine-tuned on
  Pick-a-Pic preferences; the score is logit_scale * cos(image, prompt). Loaded with
  transformers' ``CLIPModel`` from a local folder or a hub id (``yuvalkirstain/PickScore_v1``,
  whose processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
- ``hpsv2`` (Wu et al. 2023, https://arxiv.org/abs/2306.09341): OpenCLIP ViT-H-14 with the HPS v2
  weights file (``HPS_v2_compressed.pt``, given by path), score = cos(image, prompt).

Both are differentiable in the images.
"""

from __future__ import annotations

import torch

from flowrl.errors import MissingFileError
from flowrl.rewards import register_reward


@register_reward("pickscore", differentiable=True)
def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | torch.device = "cpu",
):
    """``model``/``processor``: hub ids or local folders (``processor`` null: the model's own
    folder holds the tokenizer, or flowrl's offline CLIP tokenizer is used)."""
    from transformers import AutoTokenizer, CLIPModel

    from flowrl.rewards.clip import preprocess

    net = CLIPModel.from_pretrained(model).to(device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(processor or model)
    except (OSError, ValueError):
        if processor is not None:
            raise
        from flowrl.models.tokenizer import offline_clip_tokenizer

        tokenizer = offline_clip_tokenizer()
    size = net.config.vision_config.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)

    def features(out) -> torch.Tensor:  # transformers 5 returns an output object, 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def reward_fn(images, prompts, metadata):
        pixels = preprocess(images.to(device).float(), size, mean, std)
        img = features(net.get_image_features(pixel_values=pixels))
        ids = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            txt = features(
                net.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
            )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return net.logit_scale.exp() * (img * txt).sum(-1), {}

    return reward_fn


@register_reward("hpsv2", differentiable=True)
def hpsv2(weights: str, clip_model: str = "ViT-H-14", device: str | torch.device = "cpu"):
    """``weights``: path to the HPS v2 checkpoint (an OpenCLIP state dict, optionally under a
    ``state_dict`` key), loaded with ``torch.load(weights_only=True)`` or safetensors."""
    from pathlib import Path

    from flowrl.rewards.clip import load_open_clip, similarity_reward

    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"hpsv2 weights {weights!r} not found; download HPS_v2_compressed.pt and give its path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    clip, tokenizer, size, mean, std = load_open_clip(clip_model, None, "cpu")
    clip.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    clip = clip.to(device)
    return similarity_reward(clip, tokenizer, size, mean.to(device), std.to(device), device)
