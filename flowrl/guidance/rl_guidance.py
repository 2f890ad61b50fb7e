"""RL guidance: a dial on a fine-tune after the fact, like classifier-free guidance.

With base (reference) prediction f_0 and fine-tuned prediction f_1 at the same (x_t, t, c):

    f_w = f_0 + w * (f_1 - f_0)

w = 0 is the base model, w = 1 the fine-tuned model exactly, w > 1 extrapolates. Why w acts as the
inverse KL coefficient: KL-regularized RL with coefficient beta has the optimum
p_beta ∝ p_0 * exp(r / beta), whose score is grad log p_0 + grad r / beta. If the fine-tune
approximates p_beta, its score difference f_1 - f_0 is about grad r / beta, so f_w has score
grad log p_0 + w * grad r / beta: the optimum for the coefficient beta / w. Doubling w halves the
effective KL weight, without training again.

For a LoRA fine-tune both predictions come from one batched forward: the batch is doubled and
peft's mixed-adapter batching runs the first half with the adapter off (``__base__``) and the
second half with it on. A full fine-tune uses the frozen reference copy (two forwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def rl_guidance_mix(base: Tensor, tuned: Tensor, weight: float) -> Tensor:
    """f_w = f_0 + w * (f_1 - f_0), as ``torch.lerp``: exactly f_0 at w = 0 and f_1 at w = 1."""
    return torch.lerp(base, tuned, weight)


@contextlib.contextmanager
def mixed_adapter_batch(denoiser: nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """Route sample i of the next forwards through LoRA adapter ``adapter_names[i]``
    (``"__base__"`` = no adapter), by passing peft's ``adapter_names`` to every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    def pre_hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = [
        m.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for m in denoiser.modules()
        if isinstance(m, LoraLayer)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class RLGuidedAdapter(nn.Module):
    """An adapter whose prediction is the w-mix of a base and a fine-tuned model; everything else
    (conditioning, decoding, shapes, a policy's noise network) is the fine-tune's, so any sampler
    runs it. Works for text-to-image adapters and robot policies alike.

    Args:
        adapter: the fine-tuned adapter: a LoRA (base = its adapter disabled, both in one batched
            forward), or a full fine-tune that keeps its reference (base = the frozen copy; a DPPO
            fine-tune keeps one), or any adapter when ``base`` is given.
        weight: w (0 = base, 1 = fine-tuned, > 1 = stronger than the fine-tune).
        base: a second model of the same family and shapes to use as the base (e.g. the BC
            policy, ``load_policy(<pretrain folder>)``); two forwards per step.
    """

    def __init__(self, adapter, weight: float, base: nn.Module | None = None):
        super().__init__()
        self.inner = adapter
        self.weight = weight
        self.base = base
        if base is not None:
            shape = (getattr(base, "kind", None), tuple(base.latent_shape))
            if shape != (getattr(adapter, "kind", None), tuple(adapter.latent_shape)):
                raise ValueError(
                    f"base and fine-tuned model differ: {shape[0]} {shape[1]} vs "
                    f"{getattr(adapter, 'kind', None)} {tuple(adapter.latent_shape)}"
                )
        # the LoRA adapter's name: "default" when flowrl added it, whatever name diffusers'
        # load_lora_weights gave it otherwise; None for a full fine-tune (reference copy)
        denoiser = getattr(adapter, "denoiser", None)
        self.lora_name = next(iter(getattr(denoiser, "peft_config", None) or {}), None)
        if base is None and self.lora_name is None and not adapter.has_reference:
            raise ValueError(
                "RL guidance needs a base and a fine-tuned model: a LoRA on the denoiser, a full "
                "fine-tune that keeps its reference, or the base itself: pass base=load_policy(<BC "
                "folder>) for a robot policy (a ReinFlow fine-tune keeps no copy of it; a DPPO one does)"
            )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def latent_shape(self):
        return self.inner.latent_shape

    @property
    def has_reference(self) -> bool:
        return True  # the mix of the two references (see reference_forward)

    def condition(self, inputs, guidance_scale: float = 1.0):
        return self.inner.condition(inputs, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.inner.decode(latents)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.inner.decode_latents(latents)

    def _base(self, latents, timesteps, cond, guidance_scale):
        if self.base is not None:
            return self.base(latents, timesteps, cond, guidance_scale)
        return self.inner.reference_forward(latents, timesteps, cond, guidance_scale)

    def forward(
        self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        inner, w = self.inner, self.weight
        if self.base is not None or self.lora_name is None:
            base = self._base(latents, timesteps, cond, guidance_scale)
            return rl_guidance_mix(base, inner(latents, timesteps, cond, guidance_scale), w)
        B = latents.shape[0]
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(B)
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        names = ["__base__"] * B + [self.lora_name] * B
        if guidance_scale > 1.0 and inner.uses_cfg:  # the adapter's CFG doubles the batch again
            names = names * 2
        with mixed_adapter_batch(inner.denoiser, names):
            out = inner(
                torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), doubled, guidance_scale
            )
        base, tuned = out.chunk(2)
        return rl_guidance_mix(base, tuned, w)

    @torch.no_grad()
    def reference_forward(
        self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        """Where a sampler asks for the reference (DPPO's frozen first steps): the mix of the two
        models' references there (the base's own prediction, the fine-tune's frozen copy)."""
        base = self._base(latents, timesteps, cond, guidance_scale)
        return rl_guidance_mix(
            base, self.inner.reference_forward(latents, timesteps, cond, guidance_scale), self.weight
        )
