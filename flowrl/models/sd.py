"""Stable Diffusion 1.x/2.x through diffusers: the UNet adapter.

The adapter answers one question for the sampler: the UNet's raw output (eps, v or x0, as the
scheduler's ``prediction_type`` says) at latents x_t (B, C, H, W), timesteps t (B,) and text
embeddings (B, L, D), with classifier-free guidance done in one batched forward:

    out = out_uncond + w * (out_cond - out_uncond)

It also owns what the model family needs around that: prompt encoding, latent decoding, LoRA
(peft, the way diffusers' own LoRA trainers add it) or full fine-tuning, and the reference
policy for the KL term (the same UNet with the LoRA adapter disabled; a frozen copy only for
full fine-tuning).

The text encoder can train too (TexForce, Chen et al. 2024, arXiv 2311.15657), alone (the UNet
frozen, ``finetune="frozen"``) or with the UNet: ``text_encoder_finetune="lora"`` (peft LoRA on
CLIP's attention projections q/k/v/out_proj, TexForce's targets) or ``"full"``. Then the
condition carries the prompts' token ids (``input_ids``, and ``negative_input_ids`` under CFG)
beside their embeddings, and every prediction recomputes the embeddings from the ids with the
current text encoder, so the update's forwards differentiate through it (TexForce's trainer
does the same: ``text_encoder(sample["prompt_ids"])`` in the update, for the negative prompt
too). The stored ``prompt_embeds`` are what the sampler used, for readers that want a detached
summary of the prompt (critics, the noise policy). Under ``torch.no_grad`` the embeddings of the
same id tensor are reused while the text encoder's parameters are unchanged (their version
counters), so sampling encodes each batch once. The reference policy disables the text
encoder's LoRA too (or uses its frozen copy under full fine-tuning).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.errors import ConfigError
from flowrl.models.base import DenoiserAdapter, latent_size, vae_decode, vae_scale

TEXT_ENCODER_MODES = ("frozen", "lora", "full")
TEXT_PREFIX = "text_encoder."  # the text encoder's parameters in trainable_state_dict


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
            :class:`~flowrl.models.base.DenoiserAdapter` (``finetune="frozen"``: the UNet does not
            train, e.g. when only the text encoder does).
        text_encoder_finetune: ``"frozen"`` (the default), ``"lora"`` or ``"full"``: whether and
            how the text encoder trains (TexForce; see the module docstring).
        text_encoder_lora_rank, text_encoder_lora_alpha: its LoRA rank (None: ``lora_rank``) and
            alpha (None: its rank).
        resolution: (height, width) in pixels, or an int for a square (None: the UNet's
            ``sample_size`` x the VAE scale; see :func:`~flowrl.models.base.latent_size`).
    """

    family = "sd"
    text_encoders = ("text_encoder",)
    trains_text_encoder = True  # text_encoder_finetune is implemented (SDXL's and LCM's say False)
    text_encoder_lora_target_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]  # TexForce's

    def __init__(
        self,
        pipeline,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
        text_encoder_finetune: str = "frozen",
        text_encoder_lora_rank: int | None = None,
        text_encoder_lora_alpha: float | None = None,
        resolution: int | list[int] | None = None,
    ):
        if text_encoder_finetune not in TEXT_ENCODER_MODES:
            raise ConfigError(
                f"model.text_encoder_finetune: unknown mode {text_encoder_finetune!r}; set frozen, lora or full"
            )
        if text_encoder_finetune != "frozen" and not self.trains_text_encoder:
            raise ConfigError(
                f"model.text_encoder_finetune={text_encoder_finetune}: training the text encoder is implemented "
                f"for the sd family (Stable Diffusion 1.x/2.x, the digits model), not {self.family} yet; set "
                "model.text_encoder_finetune=frozen"
            )
        frozen = self.frozen_networks(pipeline)
        if text_encoder_finetune == "full":  # trained in float32 from the loaded weights, not a cast copy
            frozen.pop("text_encoder")
        super().__init__(
            pipeline.unet,
            frozen,
            pipeline.scheduler.config,
            finetune,
            lora_rank,
            lora_alpha,
            weight_dtype,
            keep_reference,
        )
        self.pipeline = pipeline
        self.unet = pipeline.unet
        size = self.unet.config.sample_size
        scale = vae_scale(self.vae)
        default = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_hw = latent_size(resolution, default, scale, scale, self.family)  # (h, w) latent cells
        self.tokenizer = pipeline.tokenizer
        self._negative_embeds: Tensor | None = None
        self.text_encoder_finetune = text_encoder_finetune
        self._text_reference: nn.Module | None = None
        self._in_reference = False
        self._embed_memo: list[tuple[Tensor, tuple, Tensor]] = []
        if text_encoder_finetune == "lora":
            self._add_text_encoder_lora(
                lora_rank if text_encoder_lora_rank is None else text_encoder_lora_rank,
                text_encoder_lora_alpha,
            )
        elif text_encoder_finetune == "full":
            self.text_encoder = pipeline.text_encoder.float().requires_grad_(True)
            if keep_reference:
                self._text_reference = copy.deepcopy(self.text_encoder).requires_grad_(False).to(weight_dtype)

    def _add_text_encoder_lora(self, rank: int, alpha: float | None) -> None:
        """peft LoRA on the text encoder's attention projections, as TexForce adds it (B = 0 at init,
        so the adapted encoder starts equal to the base); the LoRA weights train in float32."""
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise ConfigError(
                f"model.text_encoder_lora_rank must be >= 1 for LoRA, got {rank}; set e.g. "
                "model.text_encoder_lora_rank=16 (TexForce), or model.text_encoder_finetune=full"
            )
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=self.text_encoder_lora_target_modules,
        )
        # peft's own injection (what transformers' add_adapter calls, without its peft version floor)
        inject_adapter_in_model(config, self.text_encoder, adapter_name="default")
        for p in self.text_encoder.parameters():
            if p.requires_grad:
                p.data = p.data.float()

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
        return (self.unet.config.in_channels, *self.latent_hw)

    # ------------------------------------------------------------------ what trains
    def _text_trainable(self) -> list[tuple[str, nn.Parameter]]:
        if self.text_encoder_finetune == "frozen":
            return []
        return [(n, p) for n, p in self.text_encoder.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + [p for _, p in self._text_trainable()]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The denoiser's trained parameters by their own names, the text encoder's under ``text_encoder.``."""
        out = super().trainable_state_dict()
        out.update({TEXT_PREFIX + n: p.detach() for n, p in self._text_trainable()})
        return out

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.text_encoder_finetune == "frozen":
            return super().load_trainable_state_dict(state)
        text = {k.removeprefix(TEXT_PREFIX): v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
        own = dict(self._text_trainable())
        if set(text) != set(own):
            missing, unexpected = sorted(set(own) - set(text)), sorted(set(text) - set(own))
            raise KeyError(
                f"checkpoint does not match the text encoder: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) parameters. Was it written with the "
                "same model.text_encoder_finetune / model.text_encoder_lora_rank?"
            )
        super().load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)})
        with torch.no_grad():
            for n, t in text.items():
                own[n].copy_(t)

    @property
    def trainable_module(self) -> nn.Module:
        """The trained networks: the UNet, the text encoder, or both (one module for accelerate)."""
        if self.text_encoder_finetune == "frozen":
            return self.denoiser
        if self.finetune == "frozen":
            return self.text_encoder
        return nn.ModuleDict({"unet": self.denoiser, "text_encoder": self.text_encoder})

    @property
    def has_reference(self) -> bool:
        if self.text_encoder_finetune == "frozen":
            return super().has_reference
        unet = self.finetune in ("lora", "frozen") or self._reference is not None
        return unet and (self.text_encoder_finetune == "lora" or self._text_reference is not None)

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        """The UNet's reference (LoRA off, its frozen copy, or itself when frozen) and, while inside,
        the text encoder's: its LoRA off, or its frozen copy."""
        with super().reference_mode() as net:
            if self.text_encoder_finetune == "frozen":
                yield net
                return
            if self.text_encoder_finetune == "full" and self._text_reference is None:
                raise RuntimeError(
                    "full fine-tuning of the text encoder has no reference: build the adapter with "
                    "keep_reference=True (the trainer does when the objective's keeps_reference(cfg) says so)"
                )
            lora = self.text_encoder_finetune == "lora"
            if lora:
                _set_lora_enabled(self.text_encoder, False)
            self._in_reference = True
            try:
                yield net
            finally:
                self._in_reference = False
                if lora:
                    _set_lora_enabled(self.text_encoder, True)

    # ------------------------------------------------------------------ conditioning
    def token_ids(self, prompts: list[str]) -> Tensor:
        """(B, L) the tokenizer's ids of the prompts, padded to its max length, on the text encoder's device."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """(B, L, D) text-encoder hidden states for the prompts, float32."""
        return self.text_encoder(self.token_ids(prompts))[0].float()

    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        if self.text_encoder_finetune != "frozen":
            return self._trained_text_condition(prompts, guidance_scale)
        cond = {"prompt_embeds": self.encode_prompts(prompts)}
        if guidance_scale > 1.0:
            if self._negative_embeds is None or self._negative_embeds.device != cond["prompt_embeds"].device:
                self._negative_embeds = self.encode_prompts([""])
            cond["negative_prompt_embeds"] = self._negative_embeds.expand(len(prompts), -1, -1)
        return cond

    @torch.no_grad()
    def _trained_text_condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        """The token ids the predictions re-encode, and their embeddings now (what sampling uses)."""
        ids = self.token_ids(prompts)
        cond = {"prompt_embeds": self._encode_ids(ids), "input_ids": ids}
        if guidance_scale > 1.0:  # the empty negative prompt, through the trained encoder too (TexForce)
            neg = self.token_ids([""]).repeat(len(prompts), 1)
            cond.update(negative_prompt_embeds=self._encode_ids(neg), negative_input_ids=neg)
        return cond

    def _encode_ids(self, ids: Tensor) -> Tensor:
        """(B, L, D) float32 hidden states of the current text encoder (or, in reference mode, the
        reference's). With gradient enabled always recomputed; without, reused for the same id tensor
        while the text encoder's trained parameters are unchanged."""
        net = (
            self._text_reference
            if self._in_reference and self._text_reference is not None
            else self.text_encoder
        )
        if torch.is_grad_enabled():
            return net(ids)[0].float()
        device = ids.device.type
        key = (
            ids._version,
            sum(p._version for _, p in self._text_trainable()),
            self._in_reference,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        for memo_ids, memo_key, embeds in self._embed_memo:
            if memo_ids is ids and memo_key == key:  # the memo holds ids alive: its identity is not reused
                return embeds
        embeds = net(ids)[0].float()
        self._embed_memo = [*self._embed_memo[-3:], (ids, key, embeds)]
        return embeds

    def _text_embeddings(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """``cond`` with its embeddings recomputed from its token ids by the current text encoder."""
        if "input_ids" not in cond:
            raise KeyError(
                "the text encoder trains (model.text_encoder_finetune="
                f"{self.text_encoder_finetune}), so a condition must carry the prompts' token ids "
                "(input_ids): build it with adapter.condition(prompts, guidance_scale)"
            )
        out = {k: v for k, v in cond.items() if not k.endswith("input_ids")}
        out["prompt_embeds"] = self._encode_ids(cond["input_ids"])
        if "negative_input_ids" in cond:
            out["negative_prompt_embeds"] = self._encode_ids(cond["negative_input_ids"])
        return out

    def _predict(
        self,
        net: nn.Module,
        latents: Tensor,
        timesteps: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float,
    ) -> Tensor:
        if self.text_encoder_finetune != "frozen":
            cond = self._text_embeddings(cond)
        return super()._predict(net, latents, timesteps, cond, guidance_scale)

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

    def save_pretrained_weights(self, folder) -> None:
        """As the base (UNet LoRA for ``load_lora_weights``, or the ``unet`` folder), with a trained
        text encoder's LoRA in the same ``pytorch_lora_weights.safetensors`` (diffusers'
        ``text_encoder.`` keys, which ``StableDiffusionPipeline.load_lora_weights`` loads into the
        pipeline's text encoder), or its full weights as a ``text_encoder`` folder."""
        if self.text_encoder_finetune == "frozen":
            return super().save_pretrained_weights(folder)
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        lora: dict = {}
        for name, net, mode in (
            ("unet", self.denoiser, self.finetune),
            ("text_encoder", self.text_encoder, self.text_encoder_finetune),
        ):
            if mode == "lora":
                lora[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
                lora[f"{name}_lora_adapter_metadata"] = net.peft_config["default"].to_dict()
            elif mode == "full":
                net.save_pretrained(folder / name)
        if lora:
            StableDiffusionPipeline.save_lora_weights(folder, **lora)

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
        )


def _set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every peft LoRA layer of ``module`` on or off (peft's own per-layer switch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)
