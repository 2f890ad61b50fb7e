"""The one data structure that crosses the seam between samplers and the policy-gradient core.

Shape legend (used across flowrl):
    B  trajectories in the batch
    K  denoising steps, stored in sampling order (k = 0 is the noisiest)
    C, H, W  the sample's (latent) event shape; Ta, Da for an action chunk
    L, D  text-encoder sequence length and width; To, Do an observation history
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Chain:
    """A batch of denoising trajectories, each step a Gaussian transition with a known log-prob.

    Attributes:
        latents: (B, K+1, C, H, W) the states x_{t_0}, ..., x_{t_K}; x_{t_0} is the initial
            noise and ``latents[:, -1]`` the final sample. Transition k maps
            ``latents[:, k]`` to ``latents[:, k + 1]``.
        timesteps: (B, K) the model's timestep t_k at each transition.
        next_timesteps: (B, K) the timestep the transition lands on (what the step math needs
            besides t_k; negative means "past the end of the schedule").
        log_probs: (B, K) log p(x_{k+1} | x_k, c) under the sampling policy, reduced over the
            event dimensions as the sampler's ``logprob_reduction`` says. NaN where a step
            is deterministic (std 0) and therefore not part of the MDP.
        cond: per-trajectory condition tensors, each with leading dim B (text-to-image:
            ``prompt_embeds`` (B, L, D) and, with CFG, ``negative_prompt_embeds`` (B, L, D);
            a policy: ``obs`` (B, To, Do), the normalized observation history).
        prompts: the B prompts, as text (empty when the condition is not text).
        guidance_scale: the classifier-free guidance scale the chain was sampled with; the
            log-prob must be re-evaluated with the same scale (1 for policies).
        samples: (B, ...) decoded samples (images in [0, 1], actions in env units), once decoded.
        rewards: (B,) once scored (per action chunk for an environment).
        advantages: (B,) once computed.
    """

    latents: Tensor
    timesteps: Tensor
    next_timesteps: Tensor
    log_probs: Tensor
    cond: dict[str, Tensor]
    prompts: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    samples: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    @property
    def states(self) -> Tensor:
        """(B, K, C, H, W) x_k, the state each transition starts from."""
        return self.latents[:, :-1]

    @property
    def next_states(self) -> Tensor:
        """(B, K, C, H, W) x_{k+1}, the state each transition lands on."""
        return self.latents[:, 1:]

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def select(self, index: Tensor | list[int] | slice) -> Chain:
        """The sub-batch of trajectories at ``index`` (along B)."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        out = {name: getattr(self, name)[index] for name in self._tensor_fields()}
        out["cond"] = {k: v[index] for k, v in self.cond.items()}
        if self.prompts:
            idx = range(len(self))[index] if isinstance(index, slice) else index.tolist()
            out["prompts"] = [self.prompts[i] for i in idx]
        return replace(self, **out)

    def to(self, device: torch.device | str) -> Chain:
        out = {name: getattr(self, name).to(device) for name in self._tensor_fields()}
        out["cond"] = {k: v.to(device) for k, v in self.cond.items()}
        return replace(self, **out)

    @staticmethod
    def cat(chains: list[Chain]) -> Chain:
        """Concatenate along B (all chains must share K and guidance scale)."""
        first = chains[0]
        if any(c.guidance_scale != first.guidance_scale for c in chains):
            raise ValueError("cannot concatenate chains sampled with different guidance scales")
        out: dict = {}
        for name in first._tensor_fields():
            out[name] = torch.cat([getattr(c, name) for c in chains])
        out["cond"] = {k: torch.cat([c.cond[k] for c in chains]) for k in first.cond}
        out["prompts"] = [p for c in chains for p in c.prompts]
        return replace(first, **out)

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict, for saving with safetensors."""
        out = {name: getattr(self, name).contiguous() for name in self._tensor_fields()}
        out.update({f"cond.{k}": v.contiguous() for k, v in self.cond.items()})
        return out
