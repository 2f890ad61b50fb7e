"""SD3-family flow-matching transformers through diffusers (``StableDiffusion3Pipeline``).

The transformer predicts the velocity v = eps - x_0 at (x_s, s * 1000); conditions are the
pipeline's own ``encode_prompt`` outputs: ``prompt_embeds`` (B, L, D) (CLIP-L and CLIP-G hidden
states, and T5's when the pipeline has it) and ``pooled_prompt_embeds`` (B, P). T5 is optional,
as in diffusers (``text_encoder_3=None``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.models.base import FlowTransformerAdapter, latent_size, vae_decode, vae_scale


def build_tiny_sd3_pipeline(image_size: int = 32, seed: int = 0, shift: float = 3.0):
    """A StableDiffusion3Pipeline of real diffusers classes with tiny random weights, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from flowrl.models.tiny import tiny_clip_text_encoder, tiny_tokenizer, tiny_vae

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # = CLIP-L (32) + CLIP-G (32) hidden sizes, as T5's width would be
        pooled_projection_dim=64,  # = the two CLIP projections concatenated
        out_channels=4,
    )
    # decoder_offset: about 10x the untrained model's final latents as the VAE sees them (std 1.0 / 0.18215
    # scaling factor), so the JPEG size of its images follows their scale (see tiny_vae)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(image_size, 4, seed + 1, shift_factor=0.0609, decoder_offset=55.0),
        text_encoder=tiny_clip_text_encoder(32, seed + 2, with_projection=True),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(32, seed + 3, with_projection=True),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


class SD3Adapter(FlowTransformerAdapter):
    """The transformer of a StableDiffusion3Pipeline as a velocity-predicting policy network.

    Args (beyond :class:`DenoiserAdapter`'s):
        max_sequence_length: T5 tokens (when the pipeline has T5).
        resolution: (height, width) in pixels, or an int for a square (None: the transformer's
            ``sample_size`` x the VAE scale, 1024 for SD3.5; Flow-GRPO trains at 512).
    """

    family = "sd3"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_pipeline = "StableDiffusion3Pipeline"

    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        return build_tiny_sd3_pipeline(image_size, seed)

    @classmethod
    def load_pipeline(cls, source: str, revision: str | None, prediction_type: str | None):
        """The pipeline from a folder or hub id; a local folder without T5 (its model_index.json
        entry null, as ``save_pretrained`` writes a pipeline built with ``text_encoder_3=None``, or
        the ``text_encoder_3`` / ``tokenizer_3`` folder not downloaded, T5-XXL being most of the
        download) loads without it, as diffusers supports (``from_pretrained`` refuses such a folder
        unless told ``text_encoder_3=None, tokenizer_3=None``); Flow-GRPO's code loads T5."""
        from diffusers import StableDiffusion3Pipeline

        from flowrl.errors import read_json

        path, drop = Path(source).expanduser(), {}
        if (path / "model_index.json").is_file():
            index = read_json(path / "model_index.json", "model.pretrained: pipeline index")
            names = ("text_encoder_3", "tokenizer_3")
            if any(not (index.get(n) or [None])[0] or not (path / n).is_dir() for n in names):
                drop = dict.fromkeys(names)
        return StableDiffusion3Pipeline.from_pretrained(source, revision=revision, **drop)

    def __init__(
        self,
        pipeline,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
        max_sequence_length: int = 128,
        resolution: int | list[int] | None = None,
    ):
        super().__init__(pipeline, finetune, lora_rank, lora_alpha, weight_dtype, keep_reference)
        self.max_sequence_length = max_sequence_length
        c, scale = self.transformer.config, vae_scale(self.vae)
        h, w = self.latent_hw = latent_size(
            resolution, (c.sample_size, c.sample_size), scale, scale * c.patch_size, self.family
        )
        top = (c.pos_embed_max_size or 0) * c.patch_size  # the position embedding is cropped from this
        if top and max(h, w) > top:
            from flowrl.errors import ConfigError

            raise ConfigError(
                f"model.resolution={h * scale}x{w * scale}: this SD3 transformer's position embedding covers at "
                f"most {top * scale} px a side (pos_embed_max_size {c.pos_embed_max_size}); set a smaller model.resolution"
            )
        # a scheduler with dynamic shifting sets its shift from the image token count, as
        # StableDiffusion3Pipeline does: (h / patch) x (w / patch) at the trained resolution
        self.scheduler_config.update(_image_seq_len=(h // c.patch_size) * (w // c.patch_size))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, *self.latent_hw)

    @torch.no_grad()
    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        cfg = guidance_scale > 1.0
        embeds, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=cfg,
            negative_prompt=[""] * len(prompts) if cfg else None,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}
        if cfg:
            cond.update(negative_prompt_embeds=neg.float(), negative_pooled_prompt_embeds=neg_pooled.float())
        return cond

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.compute_dtype
        return net(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
        ).sample

    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents)
