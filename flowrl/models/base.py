"""The model-adapter contract every family implements, and what they share.

An adapter wraps one trainable denoiser (a UNet or a transformer) and answers the sampler's one
question: the raw network output (eps, v, x0 or velocity) at x_t (B, C, H, W), timesteps (B,)
and a condition dict of (B, ...) tensors, with classifier-free guidance in one batched forward.
Around that it owns prompt encoding (``condition``), decoding (``decode``), LoRA (peft, added
the way diffusers' own trainers add it) or full fine-tuning, the reference policy for the KL
term, and saving weights that the family's plain diffusers pipeline loads.

Subclasses set ``family``, ``lora_target_modules`` and implement ``condition``, ``_call`` (one
forward of a given network on a batch, no guidance) and ``_save_lora``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

FINETUNE_MODES = ("lora", "full", "frozen")


class DenoiserAdapter(nn.Module):
    """Shared machinery of the model adapters.

    Args:
        denoiser: the network that is fine-tuned.
        frozen: the other networks by attribute name (text encoders, VAE; None where the pipeline
            has none): frozen, cast to ``weight_dtype``, and registered as submodules under those
            names, so ``adapter.to(device)`` moves every network the adapter runs.
        scheduler_config: the pipeline's scheduler config (samplers read their schedule from it).
        finetune: ``"lora"``, ``"full"``, or ``"frozen"`` (nothing trains: sampling, evaluation).
        lora_rank, lora_alpha: LoRA rank r and scale numerator (scale = alpha / r; alpha None = r).
        weight_dtype: dtype of frozen weights (and of the base weights under LoRA). Trainable
            parameters stay float32.
        keep_reference: for full fine-tuning, keep a frozen copy of the initial denoiser as the KL
            reference (with LoRA the reference is the denoiser with its adapter disabled: no copy).
    """

    family = "base"
    uses_cfg = True  # classifier-free guidance is a batched forward (LCM embeds the scale instead)
    lora_target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    text_encoders: tuple[str, ...] = ()  # the pipeline attributes a subclass encodes prompts with

    def __init__(
        self,
        denoiser: nn.Module,
        frozen: dict[str, nn.Module | None],
        scheduler_config: dict,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        weight_dtype: torch.dtype = torch.float32,
        keep_reference: bool = False,
    ):
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"model.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.finetune = finetune
        self.weight_dtype = weight_dtype
        self._reference: nn.Module | None = None
        for name, module in frozen.items():
            setattr(self, name, module)
            if module is not None:
                module.requires_grad_(False)
                # a VAE that says force_upcast (SDXL's, SD's) overflows to NaN images in fp16, so
                # diffusers' pipelines decode with it in float32; keep it there
                upcast = weight_dtype == torch.float16 and getattr(
                    getattr(module, "config", None), "force_upcast", False
                )
                if weight_dtype != torch.float32 and not upcast:
                    module.to(dtype=weight_dtype)
                    # and what transformers itself keeps in float32 (T5's feed-forward output
                    # projections "wo", which overflow in fp16)
                    keep = getattr(module, "_keep_in_fp32_modules", None) or []
                    for path, sub in module.named_modules() if keep else ():
                        if any(k in path.split(".") for k in keep):
                            sub.float()
        if finetune == "lora":
            from peft import LoraConfig

            if lora_rank < 1:
                raise ValueError(
                    f"model.lora_rank must be >= 1 for LoRA, got {lora_rank}; use model.finetune=full instead"
                )
            denoiser.requires_grad_(False)
            if weight_dtype != torch.float32:
                denoiser.to(dtype=weight_dtype)
            denoiser.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                    init_lora_weights="gaussian",  # B = 0: the adapted model starts equal to the base
                    target_modules=self.lora_target_modules,
                )
            )
            for p in denoiser.parameters():  # LoRA weights train in float32 whatever the base dtype
                if p.requires_grad:
                    p.data = p.data.float()
        elif finetune == "frozen":
            denoiser.requires_grad_(False)
            if weight_dtype != torch.float32:
                denoiser.to(dtype=weight_dtype)
        else:
            denoiser.requires_grad_(True)
            if keep_reference:
                self._reference = copy.deepcopy(denoiser).requires_grad_(False)
                if weight_dtype != torch.float32:
                    self._reference.to(weight_dtype)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def tiny_pipeline(image_size: int, seed: int, prediction_type: str | None):
        """A pipeline of the family with tiny random weights, built from config (tests, demos)."""
        raise NotImplementedError

    @classmethod
    def load_pipeline(cls, source: str, revision: str | None, prediction_type: str | None):
        """The family's diffusers pipeline from a local folder or hub id."""
        import diffusers

        from flowrl.models import FAMILIES

        return getattr(diffusers, FAMILIES[cls.family].pipeline).from_pretrained(source, revision=revision)

    @classmethod
    def frozen_networks(cls, pipeline) -> dict[str, nn.Module | None]:
        """The pipeline's VAE and the text encoders ``text_encoders`` names, by attribute name."""
        return {"vae": pipeline.vae, **{name: getattr(pipeline, name) for name in cls.text_encoders}}

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.denoiser.named_parameters())
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
        return next(self.denoiser.parameters()).device

    @property
    def trainable_module(self) -> nn.Module:
        """The module that holds every trained parameter (what accelerate prepares)."""
        return self.denoiser

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.denoiser, "enable_gradient_checkpointing"):
            from flowrl.errors import ConfigError

            raise ConfigError(
                f"train.gradient_checkpointing: {type(self.denoiser).__name__} does not support it; "
                "set train.gradient_checkpointing=false"
            )
        self.denoiser.enable_gradient_checkpointing()

    def compile_network(self) -> None:
        """torch.compile the denoiser in place (nn.Module.compile): parameter names, state dicts,
        LoRA adapter switching and the DDP wrapper all see the same module; only its forward is
        compiled, static shapes (one graph per batch shape)."""
        self.denoiser.compile(dynamic=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to for the denoiser's forward."""
        return torch.float32 if self.finetune == "full" else self.weight_dtype

    # ------------------------------------------------------------------ contract
    def condition(self, prompts: list[str], guidance_scale: float) -> dict[str, Tensor]:
        """The condition tensors (each with leading dim B) a Chain stores for these prompts; with
        guidance_scale > 1 also the unconditional ones, under ``negative_*`` keys."""
        raise NotImplementedError

    def _call(self, net: nn.Module, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One forward of ``net`` on a batch with the (positive) condition in ``cond``."""
        raise NotImplementedError

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] from final samples, differentiably (reward guidance)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] from final samples, float32."""
        return self.decode_latents(latents)

    # ------------------------------------------------------------------ prediction
    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Raw network output (B, C, H, W) in float32, with classifier-free guidance when scale > 1:

        out = out_uncond + w * (out_cond - out_uncond)   (one batched forward of 2B)"""
        return self._predict(self.denoiser, latents, timesteps, cond, guidance_scale)

    @torch.no_grad()
    def reference_forward(
        self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        """The reference policy's output: the denoiser with its LoRA adapter disabled (or the frozen copy)."""
        with self.reference_mode() as net:
            return self._predict(net, latents, timesteps, cond, guidance_scale)

    @property
    def has_reference(self) -> bool:
        """Whether a reference policy exists: the LoRA adapter disabled, or a frozen copy."""
        return self.finetune == "lora" or self._reference is not None

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        if self.finetune == "lora":
            self.denoiser.disable_adapters()
            try:
                yield self.denoiser
            finally:
                self.denoiser.enable_adapters()
        elif self._reference is not None:
            yield self._reference
        elif self.finetune == "frozen":
            yield self.denoiser
        else:
            raise RuntimeError(
                "full fine-tuning has no reference policy: build the adapter with keep_reference=True "
                "(the trainer does when the objective's keeps_reference(cfg) says so)"
            )

    def _predict(
        self,
        net: nn.Module,
        latents: Tensor,
        timesteps: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float,
    ) -> Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if guidance_scale > 1.0 and self.uses_cfg:
            both = {k: v for k, v in cond.items() if not k.startswith("negative_")}
            both = {k: torch.cat([cond[f"negative_{k}"], v]) for k, v in both.items()}
            out = self._call(
                net, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both
            ).float()
            uncond, text = out.chunk(2)
            return uncond + guidance_scale * (text - uncond)
        return self._call(net, latents, timesteps, cond).float()

    # ------------------------------------------------------------------ saving
    def save_pretrained_weights(self, folder: str | os.PathLike) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for the family pipeline's ``load_lora_weights``.
        Full: the denoiser's diffusers folder (``from_pretrained``)."""
        folder = Path(folder)
        if self.finetune == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser))
            self._save_lora(folder, layers, self.denoiser.peft_config["default"].to_dict())
        else:
            self.denoiser.save_pretrained(folder / self.denoiser_subfolder)

    denoiser_subfolder = "unet"


class FlowTransformerAdapter(DenoiserAdapter):
    """A diffusers pipeline's velocity-predicting transformer (SD3, Flux): the setup and LoRA
    saving the flow families share. Subclasses name the pipeline's frozen text encoders and the
    diffusers pipeline class whose ``save_lora_weights`` writes their LoRA files."""

    denoiser_subfolder = "transformer"
    lora_pipeline = ""  # e.g. "StableDiffusion3Pipeline"

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
            pipeline.transformer,
            self.frozen_networks(pipeline),
            pipeline.scheduler.config,
            finetune,
            lora_rank,
            lora_alpha,
            weight_dtype,
            keep_reference,
        )
        self.prediction_type = "flow"
        self.pipeline = pipeline
        self.transformer = pipeline.transformer

    def _save_lora(self, folder: Path, layers: dict[str, Tensor], metadata: dict) -> None:
        import diffusers

        getattr(diffusers, self.lora_pipeline).save_lora_weights(
            folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )


def vae_scale(vae) -> int:
    """Pixels per latent cell: 2^(VAE levels - 1) (diffusers' ``vae_scale_factor``), 1 without a VAE."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(
    resolution: int | list[int] | tuple[int, int] | None,
    default: tuple[int, int],
    scale: int,
    multiple: int,
    family: str,
) -> tuple[int, int]:
    """(h, w) latent cells for ``model.resolution`` in pixels (an int: square; [height, width]),
    or ``default`` (the model's own, in latent cells) when it is None. Both sides must be positive
    multiples of ``multiple`` pixels (the VAE scale x the denoiser's patch size)."""
    if resolution is None:
        return default
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if min(h, w) < multiple or h % multiple or w % multiple:
        from flowrl.errors import ConfigError

        def near(s: int) -> int:
            return max(multiple, round(s / multiple) * multiple)

        raise ConfigError(
            f"model.resolution={h}x{w}: a {family} model's height and width must be positive multiples of "
            f"{multiple} px (VAE scale {scale} x patch {multiple // scale}); set e.g. "
            f"model.resolution=[{near(h)}, {near(w)}]"
        )
    return h // scale, w // scale


def vae_decode(vae, latents: Tensor) -> Tensor:
    """(B, 3, H, W) images in [0, 1] from latents, honouring the VAE's scaling and shift factors."""
    dtype = next(vae.parameters()).dtype
    latents = latents.to(dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents + shift
    return (vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)
