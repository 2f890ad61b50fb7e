"""Best-of-N: draw N samples per prompt with the sampler as it is and keep the highest reward.
Works with any reward (no gradient needed); costs N times the network evaluations."""

from __future__ import annotations

import torch

from flowrl.guidance.common import GuidanceResult, score


@torch.no_grad()
def best_of_n(
    sampler,
    adapter,
    reward,
    prompts: list[str],
    n: int = 4,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> GuidanceResult:
    """Returns one sample per prompt (or observation history): the best of ``n`` (ties: the
    first); ``deterministic`` draws the candidates along the mean path (they differ by x_0)."""
    if n < 1:
        raise ValueError(f"best_of_n needs n >= 1, got {n}")
    B = len(prompts)
    repeated = [p for p in prompts for _ in range(n)]  # (B * n,), prompt-major
    chain = sampler.sample(
        adapter, repeated, guidance_scale, generator=generator, deterministic=deterministic
    )
    final = chain.latents[:, -1]
    images = adapter.decode(final)
    rewards = score(reward, images, repeated).view(B, n)
    best = rewards.argmax(dim=1)  # (B,)
    pick = torch.arange(B, device=best.device) * n + best
    cfg_factor = 2 if guidance_scale > 1 and getattr(adapter, "uses_cfg", True) else 1
    return GuidanceResult(
        latents=final[pick],
        images=images[pick],
        rewards=rewards.gather(1, best[:, None]).squeeze(1),
        nfe=float(n * sampler.num_steps * cfg_factor),
        info={"all_rewards": rewards},
    )
