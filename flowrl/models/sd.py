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

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


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
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from flowrl.models.tokenizer import CLIP_VOCAB_SIZE, offline_clip_tokenizer

    if image_size % 8:
        raise ValueError(f"tiny pipeline image_size must be a multiple of 8, got {image_size}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=image_size,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    # Stable Diffusion's own scheduler config (steps_offset=1, set_alpha_to_one=False): with
    # them the last DDIM step keeps a non-zero std, so its log-prob is finite at eta > 0.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=offline_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_sd_pipeline(
    pretrained: str, *, revision: str | None = None, prediction_type: str | None = None, **tiny_kwargs
):
    """Load a Stable Diffusion pipeline from a hub id, a local folder, or ``"tiny"``.

    Raises a ``FileNotFoundError`` that names the path when a local-looking path is missing, rather
    than letting the hub client try to resolve it as a repository id.
    """
    if pretrained == "tiny":
        return build_tiny_sd_pipeline(prediction_type=prediction_type or "epsilon", **tiny_kwargs)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    looks_local = pretrained.startswith((".", "/", "~")) or os.sep in pretrained.strip("/").split("/", 1)[-1]
    path = Path(pretrained).expanduser()
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"model.pretrained: folder {pretrained!r} does not exist. Give a local diffusers pipeline "
            "folder (one with model_index.json), a hub id such as 'runwayml/stable-diffusion-v1-5', or 'tiny'."
        )
    if path.exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"model.pretrained: {pretrained!r} has no model_index.json, so it is not a diffusers pipeline "
            "folder. Save one with `pipeline.save_pretrained(folder)` or give a hub id."
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path) if path.exists() else pretrained,
        revision=revision,
        safety_checker=None,
        requires_safety_checker=False,
    )
    config = dict(pipe.scheduler.config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    pipe.scheduler = DDIMScheduler.from_config(config)
    return pipe


class StableDiffusionAdapter(nn.Module):
    """The UNet of a Stable Diffusion pipeline, as a policy network for the samplers.

    Args:
        pipeline: a ``StableDiffusionPipeline`` (see :func:`load_sd_pipeline`), or any object with
            its ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler`` and ``vae`` attributes;
            ``vae=None`` makes a pixel-space model (the UNet denoises images in [-1, 1]).
        finetune: ``"lora"`` (peft adapter on the attention projections), ``"full"``, or ``"frozen"``
            (nothing trains: sampling and evaluation, e.g. after ``pipeline.load_lora_weights``).
        lora_rank, lora_alpha: the LoRA rank r and scale numerator (scale = alpha / r).
        weight_dtype: dtype of the frozen networks (VAE, text encoder, and the UNet base weights
            under LoRA). Trainable parameters stay float32.
        keep_reference: for full fine-tuning, keep a frozen copy of the initial UNet as the KL
            reference (LoRA needs no copy: the reference is the UNet with the adapter disabled).
    """

    family = "stable-diffusion"

    def __init__(
        self,
        pipeline,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
    ):
        super().__init__()
        if finetune not in ("lora", "full", "frozen"):
            raise ValueError(f"model.finetune must be 'lora', 'full' or 'frozen', got {finetune!r}")
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.finetune = finetune
        self.weight_dtype = weight_dtype
        self._reference: nn.Module | None = None
        self._negative_embeds: Tensor | None = None

        self.text_encoder.requires_grad_(False)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        if weight_dtype != torch.float32:
            self.text_encoder.to(dtype=weight_dtype)
            if self.vae is not None:
                self.vae.to(dtype=weight_dtype)
        if finetune == "lora":
            from peft import LoraConfig

            if lora_rank < 1:
                raise ValueError(
                    f"model.lora_rank must be >= 1 for LoRA, got {lora_rank}; use finetune: full instead"
                )
            self.unet.requires_grad_(False)
            if weight_dtype != torch.float32:
                self.unet.to(dtype=weight_dtype)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGET_MODULES,
                )
            )
            for p in self.unet.parameters():  # LoRA weights train in float32 whatever the base dtype
                if p.requires_grad:
                    p.data = p.data.float()
        elif finetune == "frozen":
            self.unet.requires_grad_(False)
            if weight_dtype != torch.float32:
                self.unet.to(dtype=weight_dtype)
        else:
            self.unet.requires_grad_(True)
            if keep_reference:
                self._reference = copy.deepcopy(self.unet).requires_grad_(False)
                if weight_dtype != torch.float32:
                    self._reference.to(weight_dtype)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.unet.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) parameters. Was it written with the "
                "same model.finetune / model.lora_rank?"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

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
        """The condition tensors a :class:`~flowrl.chain.Chain` stores for these prompts."""
        cond = {"prompt_embeds": self.encode_prompts(prompts)}
        if guidance_scale > 1.0:
            if self._negative_embeds is None or self._negative_embeds.device != cond["prompt_embeds"].device:
                self._negative_embeds = self.encode_prompts([""])
            cond["negative_prompt_embeds"] = self._negative_embeds.expand(len(prompts), -1, -1)
        return cond

    # ------------------------------------------------------------------ prediction
    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float = 1.0,
        net: nn.Module | None = None,
    ) -> Tensor:
        """Raw UNet output (B, C, H, W) in float32, with classifier-free guidance when scale > 1.

        ``net`` is the module to call: the UNet itself by default, or its DDP wrapper in training."""
        return self._predict(self.unet if net is None else net, latents, timesteps, cond, guidance_scale)

    @torch.no_grad()
    def reference_forward(
        self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        """The reference policy's output: the UNet with its LoRA adapter disabled (or the frozen copy)."""
        with self.reference_mode() as net:
            return self._predict(net, latents, timesteps, cond, guidance_scale)

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        if self.finetune == "lora":
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()
        elif self._reference is not None:
            yield self._reference
        else:
            raise RuntimeError(
                "full fine-tuning has no reference policy: set keep_reference=True (the trainer does when algorithm.kl_coef > 0)"
            )

    def _predict(
        self,
        net: nn.Module,
        latents: Tensor,
        timesteps: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float,
    ) -> Tensor:
        dtype = torch.float32 if self.finetune == "full" else self.weight_dtype
        embeds = cond["prompt_embeds"]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if guidance_scale > 1.0:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
        out = net(latents.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype)).sample.float()
        if guidance_scale > 1.0:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1], float32 (C = 3, or the UNet's channels for a pixel-space
        model without a VAE, whose samples live in [-1, 1])."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ saving
    def save_pretrained_weights(self, folder: str | os.PathLike) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` loadable by ``pipeline.load_lora_weights``.
        Full: a diffusers ``unet/`` folder loadable by ``UNet2DConditionModel.from_pretrained``."""
        folder = Path(folder)
        if self.finetune == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            metadata = self.unet.peft_config["default"].to_dict()
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
            )
        else:
            self.unet.save_pretrained(folder / "unet")
