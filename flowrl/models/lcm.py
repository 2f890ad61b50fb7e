"""Latent consistency models through diffusers (``LatentConsistencyModelPipeline``).

An LCM-distilled Stable Diffusion UNet takes the guidance scale as a condition (``timestep_cond``,
a sinusoidal embedding of w - 1, as the pipeline computes it) instead of classifier-free
guidance, so one forward per step. The chain is :class:`~flowrl.samplers.lcm.LCMSampler`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.models.sd import StableDiffusionAdapter


def build_tiny_lcm_pipeline(image_size: int = 32, seed: int = 0):
    """A LatentConsistencyModelPipeline of real diffusers classes with tiny random weights."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from flowrl.models.tiny import tiny_clip_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

    unet = tiny_unet(image_size // 2, 4, 32, seed, time_cond_proj_dim=32)  # LCM's guidance embedding
    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    # decoder_offset: about 10x the untrained model's final latents as the VAE sees them (std 17 / 0.18215
    # scaling factor), so the JPEG size of its images follows their scale (see tiny_vae)
    return LatentConsistencyModelPipeline(
        vae=tiny_vae(image_size, 4, seed + 1, decoder_offset=950.0),
        text_encoder=tiny_clip_text_encoder(32, seed + 2),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class LCMAdapter(StableDiffusionAdapter):
    """The UNet of an LCM pipeline; guidance enters as ``timestep_cond``."""

    family = "lcm"
    uses_cfg = False
    trains_text_encoder = False  # model.text_encoder_finetune: not implemented for LCM yet

    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        return build_tiny_lcm_pipeline(image_size, seed)

    @classmethod
    def load_pipeline(cls, source: str, revision: str | None, prediction_type: str | None):
        from diffusers import LatentConsistencyModelPipeline

        return LatentConsistencyModelPipeline.from_pretrained(
            source, revision=revision, safety_checker=None, requires_safety_checker=False
        )

    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        embeds = self.encode_prompts(prompts)
        dim = self.unet.config.time_cond_proj_dim
        # on the CPU, as diffusers' LCM pipeline does: get_guidance_scale_embedding builds its
        # frequencies there, so a CUDA w would meet a CPU tensor
        w = torch.full((len(prompts),), guidance_scale - 1.0)
        cond = {"prompt_embeds": embeds}
        if dim is not None:
            emb = self.pipeline.get_guidance_scale_embedding(w, embedding_dim=dim)
            cond["timestep_cond"] = emb.float().to(embeds.device)
        return cond

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.compute_dtype
        tc = cond.get("timestep_cond")
        return net(
            latents.to(dtype),
            timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            timestep_cond=tc.to(dtype) if tc is not None else None,
        ).sample

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        from diffusers import LatentConsistencyModelPipeline

        LatentConsistencyModelPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
        )
