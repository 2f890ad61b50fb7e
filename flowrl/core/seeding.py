"""Every random draw of a run derives from (seed, epoch, rank, stream), so a run resumed from a
checkpoint repeats exactly what the uninterrupted run would have done.

A stream names what a draw is for; each collector and the update loop take their own:

    SAMPLE   sampling noise of the epoch's chains     PROMPTS  prompt draws (text-to-image)
    RESET    environment reset seeds (env)            UPDATE   minibatch shuffles, step subsets
    TORCH    torch's global generator for the epoch   OBJECTIVE  an objective's own draws (FPO)

Two derivations exist, one per collector kind, because each domain's published numbers (the
quickstart table, the robot tasks' returns) were measured with its own and must reproduce bit
for bit: ``text_to_image`` hashes (seed, epoch, rank, stream, ...) into two 32-bit words and
draws a fresh update generator per pass; ``env`` hashes (seed, epoch, stream, ...) into one
64-bit word and shares one update generator across the passes of an epoch. Both are
numpy ``SeedSequence`` hashes: stable across runs, machines and processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

SAMPLE, PROMPTS, RESET, UPDATE, TORCH, OBJECTIVE = 0, 1, 1, 2, 3, 4
SCHEMES = ("text_to_image", "env")


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers: two 32-bit words of their SeedSequence hash."""
    return int(
        np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32).astype(np.uint64)
        @ np.array([1 << 31, 1], dtype=np.uint64)
    ) % (1 << 63)


def seed_for64(*parts: int) -> int:
    """A 63-bit seed from integers: the first 64-bit word of their SeedSequence hash, halved."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Seeds:
    """The seeds of one process of a run.

    Args:
        seed: ``train.seed``.
        rank: this process's index (0 in a single-process run).
        scheme: ``text_to_image`` or ``env`` (see the module docstring).
    """

    def __init__(self, seed: int, rank: int = 0, scheme: str = "text_to_image"):
        if scheme not in SCHEMES:
            raise ValueError(f"seed scheme must be one of {SCHEMES}, got {scheme!r}")
        self.seed, self.rank, self.scheme = seed, rank, scheme

    def int(self, epoch: int, stream: int, *extra: int) -> int:
        """The seed of one stream of one epoch on this process."""
        if self.scheme == "text_to_image":
            return seed_for(self.seed, epoch, self.rank, stream, *extra)
        # rank 0 draws what a single-process run draws; other ranks get their own streams
        tail = (1 << 32 | self.rank,) if self.rank else ()
        return seed_for64(self.seed, epoch, stream, *extra, *tail)

    def generator(self, epoch: int, stream: int, *extra: int) -> torch.Generator:
        """A CPU generator (seeded noise is then the same on any device)."""
        return torch.Generator().manual_seed(self.int(epoch, stream, *extra))

    def numpy(self, epoch: int, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng(self.int(epoch, stream, *extra))

    def update_generators(self, epoch: int, passes: int) -> Iterator[torch.Generator]:
        """The generator of each update pass over an epoch's data."""
        if self.scheme == "text_to_image":
            for p in range(passes):
                yield self.generator(epoch, UPDATE, p)
            return
        g = self.generator(epoch, UPDATE)
        for _ in range(passes):
            yield g


def draw_device(generator: torch.Generator | None, default: torch.device | str) -> torch.device:
    """Where a seeded draw must happen: on the generator's own device (torch refuses a generator
    of another one), else on ``default``. Move the result to where it is used."""
    return generator.device if generator is not None else torch.device(default)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """float32 N(0, I) noise of ``shape`` on ``device``, drawn on the generator's own device (as
    diffusers' ``randn_tensor`` does): seeded with a CPU generator, the noise is the same wherever
    the network runs, and a CUDA generator draws on the GPU directly. (torch itself refuses a
    generator of another device.)"""
    where = draw_device(generator, device)
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)
