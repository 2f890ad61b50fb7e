"""Stable Diffusion 1.x/2.x through diffusers: the UNet adapter.

The adapter answers one question for the sampler: the UNet's raw output (eps, v or x0, as the
scheduler's ``prediction_type`` says) at latents x_t (B, C, H, W), timesteps t (B,) and text
embeddings (B, L, D), with classifier-free guidance done in one batched forward:

    out = out_uncond + w * (out_cond - out_uncond)

It also owns what the model family needs around that: prompt encoding, latent decoding, LoRA
(peft, the way diffusers' own LoRA trainers add it) or full fine-tuning, and the reference
policy for the KL term (the same UNet with the LoRA adapter disabled; a frozen copy only for
full fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.models.base import DenoiserAdapter, vae_decode


def build_tiny_sd_pipeline(
    image_size: int = 32,
    prediction_type: str = "epsilon",
    seed: int = 0,
    cross_attention_dim: int = 32,
):
    """A Stable Diffusion pipeline of real diffusers classes with tiny random weights.

    Same architecture family as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL,
    CLIPTextModel, the real CLIP tokenizer, DDIM scheduler with SD's config), sized like the
    models in diffusers' own tests so that it runs in milliseconds on a CPU. The VAE halves the
    resolution: a 32x32 image has 4x16x16 latents.
    """
    from diffusers import StableDiffusionPipeline

    from flowrl.models.tiny import (
        sd_ddim_scheduler,
        tiny_clip_text_encoder,
        tiny_tokenizer,
        tiny_unet,
        tiny_vae,
    )

    if image_size % 8:
        raise ValueError(f"tiny pipeline image_size must be a multiple of 8, got {image_size}")
    unet = tiny_unet(image_size // 2, 4, cross_attention_dim, seed)
    vae = tiny_vae(image_size, 4, seed + 1)
    text_encoder = tiny_clip_text_encoder(cross_attention_dim, seed + 2)
    scheduler = sd_ddim_scheduler(prediction_type)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ddim_scheduler_of(pipe, prediction_type: str | None):
    """DDIM with the pipeline's own scheduler settings (DDPO's chain), optionally another prediction type."""
    from diffusers import DDIMScheduler

    config = dict(pipe.scheduler.config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return DDIMScheduler.from_config(config)


class StableDiffusionAdapter(DenoiserAdapter):
    """The UNet of a Stable Diffusion 1.x/2.x pipeline, as a policy network for the samplers.

    Args:
        pipeline: a ``StableDiffusionPipeline`` (see :func:`load_sd_pipeline`), or any object with
            its ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` and ``vae`` attributes;
            ``vae=None`` makes a pixel-space model (the UNet denoises images in [-1, 1]).
        finetune, lora_rank, lora_alpha, weight_dtype, keep_reference: see
            :class:`~flowrl.models.base.DenoiserAdapter`.
    """

    family = "sd"
    text_encoders = ("text_encoder",)

    def __init__(
        self,
        pipeline,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
    ):
        super().__init__(
            pipeline.unet,
            self.frozen_networks(pipeline),
            pipeline.scheduler.config,
            finetune,
            lora_rank,
            lora_alpha,
            weight_dtype,
            keep_reference,
        )
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.tokenizer = pipeline.tokenizer
        self._negative_embeds: Tensor | None = None

    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        return build_tiny_sd_pipeline(image_size, prediction_type or "epsilon", seed)

    @classmethod
    def load_pipeline(cls, source: str, revision: str | None, prediction_type: str | None):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            source, revision=revision, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = ddim_scheduler_of(pipe, prediction_type)
        return pipe

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """(B, L, D) text-encoder hidden states for the prompts, float32."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].float()

    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        cond = {"prompt_embeds": self.encode_prompts(prompts)}
        if guidance_scale > 1.0:
            if self._negative_embeds is None or self._negative_embeds.device != cond["prompt_embeds"].device:
                self._negative_embeds = self.encode_prompts([""])
            cond["negative_prompt_embeds"] = self._negative_embeds.expand(len(prompts), -1, -1)
        return cond

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.compute_dtype
        return net(latents.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype)).sample

    # ------------------------------------------------------------------ decoding and saving
    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1], float32 (C = 3, or the UNet's channels for a pixel-space
        model without a VAE, whose samples live in [-1, 1]). Differentiable."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        return vae_decode(self.vae, latents)

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
        )
