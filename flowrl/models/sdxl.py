"""SDXL through diffusers (``StableDiffusionXLPipeline``): the UNet with two text encoders.

Conditions are the pipeline's own ``encode_prompt`` outputs: ``prompt_embeds`` (B, L, D1 + D2)
(both encoders' penultimate hidden states) and the micro-conditioning that SDXL's UNet adds to
its time embedding: ``text_embeds`` (B, P), the second encoder's pooled projection, and
``time_ids`` (B, 6) = (original size, crop top-left, target size). The step math is the same
DDIM(eta) as Stable Diffusion 1.x/2.x.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.models.sd import StableDiffusionAdapter


def build_tiny_sdxl_pipeline(image_size: int = 32, seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionXLPipeline of real diffusers classes with tiny random weights."""
    from diffusers import StableDiffusionXLPipeline

    from flowrl.models.tiny import (
        sd_ddim_scheduler,
        tiny_clip_text_encoder,
        tiny_tokenizer,
        tiny_unet,
        tiny_vae,
    )

    unet = tiny_unet(
        image_size // 2,
        4,
        64,  # = 32 (CLIP-L) + 32 (CLIP-G) hidden sizes
        seed,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled projection
    )
    scheduler = sd_ddim_scheduler(prediction_type)
    # decoder_offset: about 10x the untrained model's final latents as the VAE sees them (std 4.9 / 0.18215
    # scaling factor), so the JPEG size of its images follows their scale (see tiny_vae)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(image_size, 4, seed + 1, decoder_offset=275.0),
        text_encoder=tiny_clip_text_encoder(32, seed + 2),
        text_encoder_2=tiny_clip_text_encoder(32, seed + 3, with_projection=True),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


class SDXLAdapter(StableDiffusionAdapter):
    """The UNet of an SDXL pipeline; DDIM(eta) chain like Stable Diffusion."""

    family = "sdxl"
    text_encoders = ("text_encoder", "text_encoder_2")
    trains_text_encoder = False  # model.text_encoder_finetune: not implemented for SDXL's two encoders yet

    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        return build_tiny_sdxl_pipeline(image_size, seed, prediction_type or "epsilon")

    @classmethod
    def load_pipeline(cls, source: str, revision: str | None, prediction_type: str | None):
        from diffusers import StableDiffusionXLPipeline

        from flowrl.models.sd import ddim_scheduler_of

        pipe = StableDiffusionXLPipeline.from_pretrained(source, revision=revision)
        pipe.scheduler = ddim_scheduler_of(pipe, prediction_type)
        return pipe

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the micro-conditioning's original and target size."""
        h, w = self.latent_hw
        return (h * self.pipeline.vae_scale_factor, w * self.pipeline.vae_scale_factor)

    @torch.no_grad()
    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        cfg = guidance_scale > 1.0
        embeds, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            do_classifier_free_guidance=cfg,
            negative_prompt=[""] * len(prompts) if cfg else None,
        )
        size = self.image_size
        proj_dim = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=proj_dim
        )
        time_ids = time_ids.to(self.device).expand(len(prompts), -1)
        cond = {"prompt_embeds": embeds.float(), "text_embeds": pooled.float(), "time_ids": time_ids.clone()}
        if cfg:
            cond.update(
                negative_prompt_embeds=neg.float(),
                negative_text_embeds=neg_pooled.float(),
                negative_time_ids=time_ids.clone(),
            )
        return cond

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.compute_dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return net(
            latents.to(dtype),
            timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs=added,
        ).sample

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
        )
