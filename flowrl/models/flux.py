"""Flux flow-matching transformers through diffusers (``FluxPipeline``).

The transformer predicts the velocity v = eps - x_0 at (x_s, s), like SD3's, but on *packed*
latents: each 2x2 patch of the (B, C, H, W) VAE latent becomes one token of 4C features,
(B, H/2 * W/2, 4C), with rotary position ids per token (``img_ids`` (N, 3) = (0, row, column))
and for the text (``txt_ids`` (L, 3) = 0). The adapter packs on the way in and unpacks on the
way out, so samplers see (B, C, H, W) latents and the flow samplers run unchanged.

Conditions are the pipeline's own ``encode_prompt`` outputs: ``prompt_embeds`` (B, L, D), T5's
last hidden states, and ``pooled_prompt_embeds`` (B, P), CLIP's pooled output; for
guidance-distilled models (FLUX.1-dev, ``guidance_embeds=True``) also ``guidance`` (B,), the
scale fed to the guidance embedding (FLUX.1-schnell has none). There is no batched classifier-
free guidance: as in the pipeline's default, one forward per step.

Schedule (``FluxPipeline.__call__``): base sigmas linspace(1, 1/K, K), then the exponential time
shift s -> e^mu / (e^mu + 1/s - 1) with mu linear in the image's token count (``calculate_shift``).
The adapter records both in its ``scheduler_config`` (``_sigma_schedule``, ``_image_seq_len``;
diffusers ignores private keys) for :class:`~flowrl.samplers.flow.FlowSampler`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowrl.models.base import FlowTransformerAdapter, latent_size, vae_decode, vae_scale

# whole-word pieces of the tiny T5 tokenizer (the words of flowrl's prompt sets); fixed here so the
# tiny model's vocabulary, and so its random weights, never change with the prompt sets
TINY_T5_WORDS = (
    "a an cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon "
    "fox wolf lizard beetle ant butterfly fish shark red green blue yellow square"
).split()


def build_tiny_flux_pipeline(image_size: int = 32, seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline of real diffusers classes with tiny random weights: CLIP (pooled) and a
    2-layer T5 encoder with an offline tokenizer. ``guidance_embeds`` True is dev-like, False
    schnell-like. Latents are (4, image_size / 2, image_size / 2), packed to 16-feature tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from flowrl.models.tiny import tiny_clip_text_encoder, tiny_tokenizer, tiny_vae
    from flowrl.models.tokenizer import offline_t5_tokenizer

    tokenizer_2 = offline_t5_tokenizer(TINY_T5_WORDS, model_max_length=32)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x one 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=32,  # = CLIP hidden size (pooled output)
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    torch.manual_seed(seed + 4)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()  # as from_pretrained leaves it: T5's dropout off
    # FLUX.1's scheduler config: resolution-dependent (dynamic) shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    # decoder_offset: about 10x the untrained model's final latents as the VAE sees them (std 1.0 / 0.18215
    # scaling factor), so the JPEG size of its images follows their scale (see tiny_vae)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(image_size, 4, seed + 1, shift_factor=0.1159, decoder_offset=55.0),
        text_encoder=tiny_clip_text_encoder(32, seed + 2),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = image_size // pipe.vae_scale_factor  # the pipeline's default height
    return pipe


class FluxAdapter(FlowTransformerAdapter):
    """The transformer of a FluxPipeline as a velocity-predicting policy network on unpacked latents.

    Args (beyond :class:`DenoiserAdapter`'s):
        resolution: (height, width) in pixels, or an int for a square (None: the VAE config's
            ``sample_size``, 1024 for FLUX.1, which ``save_pretrained`` keeps, unlike the
            pipeline's ``default_sample_size``; that only when the VAE config has none).
        max_sequence_length: T5 tokens (null: the T5 tokenizer's length, at most 512).
    """

    family = "flux"
    uses_cfg = False  # dev embeds the guidance scale; schnell has none
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_pipeline = "FluxPipeline"
    lora_target_modules = [
        "to_k",
        "to_q",
        "to_v",
        "to_out.0",
        "add_k_proj",
        "add_q_proj",
        "add_v_proj",
        "to_add_out",
    ]

    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        return build_tiny_flux_pipeline(image_size, seed)

    def __init__(
        self,
        pipeline,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
        max_sequence_length: int | None = None,
        resolution: int | list[int] | None = None,
    ):
        super().__init__(pipeline, finetune, lora_rank, lora_alpha, weight_dtype, keep_reference)
        scale = vae_scale(self.vae)
        own = getattr(self.vae.config, "sample_size", None)
        side = own // scale if isinstance(own, int) else pipeline.default_sample_size
        # latents are packed in 2x2 patches: each side a multiple of 2 cells
        h, w = self.latent_hw = latent_size(resolution, (side, side), scale, 2 * scale, self.family)
        self.max_sequence_length = max_sequence_length or min(pipeline.tokenizer_2.model_max_length, 512)
        self.scheduler_config.update(_sigma_schedule="flux", _image_seq_len=(h // 2) * (w // 2))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels // 4, *self.latent_hw)

    @torch.no_grad()
    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        cond = {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}
        if self.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=self.device)
        return cond

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Pack (B, C, H, W) -> (B, H/2 * W/2, 4C), one forward at time s = t / 1000, unpack."""
        dtype, pipe = self.compute_dtype, self.pipeline
        B, C, H, W = latents.shape
        packed = pipe._pack_latents(latents.to(dtype), B, C, H, W)  # (B, N, 4C)
        img_ids = pipe._prepare_latent_image_ids(B, H // 2, W // 2, latents.device, dtype)  # (N, 3)
        embeds = cond["prompt_embeds"].to(dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype)  # (L, 3)
        guidance = cond.get("guidance")
        out = net(
            hidden_states=packed,
            timestep=timesteps.to(dtype) / 1000,
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample  # (B, N, 4C)
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, H * scale, W * scale, scale)  # (B, C, H, W)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents)
