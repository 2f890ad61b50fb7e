"""Tiny random components from configs, shared by the families' tiny pipelines (for tests and
offline demos). Sizes follow diffusers' own tests; the tokenizer is the real CLIP BPE."""

from __future__ import annotations

import torch

from flowrl.models.tokenizer import CLIP_VOCAB_SIZE, offline_clip_tokenizer


def tiny_unet(sample_size: int, channels: int = 4, cross_attention_dim: int = 32, seed: int = 0, **overrides):
    """A UNet2DConditionModel sized like diffusers' tests: two blocks of (32, 64) channels, one
    layer each, cross-attention in the inner block. ``overrides`` change or add config keys
    (SDXL's added conditioning, LCM's guidance embedding)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**config, **overrides})


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's own DDIM config. steps_offset=1 and set_alpha_to_one=False keep the last
    DDIM step's std above 0, so its log-prob is finite at eta > 0."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_clip_text_encoder(
    hidden_size: int = 32,
    seed: int = 0,
    with_projection: bool = False,
    projection_dim: int = 32,
    intermediate_size: int = 37,
):
    """A 2-layer CLIP text encoder over the real CLIP vocabulary (optionally with projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tiny_vae(
    image_size: int = 32,
    latent_channels: int = 4,
    seed: int = 1,
    shift_factor: float | None = None,
    decoder_offset: float = 0.0,
):
    """A 2-block AutoencoderKL: latents are half the image size.

    ``decoder_offset`` > 0 adds a random constant, N(0, decoder_offset^2) per channel, to the bias
    of the decoder's first convolution. At the default init the decoder's normalization layers
    make its output nearly blind to the latents' scale (the JPEG size of 16 images of N(0, c^2)
    latents stays at 1.596-1.602 kB for c from 0.25 to 2), so a policy can make images cheaper
    only by learning spatially smooth latents, which a random tiny model learns slowly. With an
    offset about 10x the latents' std as the decoder sees them (latents / scaling_factor), an
    image is a fixed pattern plus a latent-driven part whose strength follows the latents' scale:
    with offset 55, 1.376, 1.260 and 1.157 kB for c = 2, 1, 0.5, a direction RL finds in a few
    epochs. The family builders set the offset from their untrained samples' latent std.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = {"shift_factor": shift_factor} if shift_factor is not None else {}
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=image_size,
        norm_num_groups=32,
        **kwargs,
    )
    if decoder_offset:
        bias = vae.decoder.conv_in.bias
        with torch.no_grad():
            bias.add_(decoder_offset * torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)))
    return vae


def tiny_tokenizer():
    return offline_clip_tokenizer()


class PixelPipeline:
    """The components of a pixel-space text-to-image model (no VAE): what the SD adapter needs."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae = (
            unet,
            text_encoder,
            tokenizer,
            scheduler,
            None,
        )


def build_tiny_pixel_pipeline(image_size: int = 16, channels: int = 3, seed: int = 0) -> PixelPipeline:
    """A random text-conditional UNet that denoises images directly (samples in [-1, 1]), with SD's
    DDIM schedule: every pixel is controllable, which makes cheap rewards (brightness) responsive."""
    unet = tiny_unet(image_size, channels, 32, seed)
    return PixelPipeline(unet, tiny_clip_text_encoder(32, seed + 2), tiny_tokenizer(), sd_ddim_scheduler())
