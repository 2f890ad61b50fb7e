"""Preference pairs from a file: the offline data of Diffusion-DPO (``train.pairs``).

The format is JSON Lines, one pair per line, image paths relative to the file's folder (absolute
paths are taken as they are)::

    {"prompt": "a handwritten digit 3", "chosen": "img/0001_w.png", "rejected": "img/0001_l.png"}

``prompt`` is the text both images were made for; ``chosen`` the preferred image and
``rejected`` the other (Pick-a-Pic's ``jpg_0`` / ``jpg_1`` with ``label_0`` already resolved).
Blank lines are skipped; any other key is kept and ignored. Images are read with PIL (PNG, JPEG,
any format it opens), converted to RGB (to grayscale for a one-channel pixel-space model such as
the digits model), resized so the shorter side is the model's image size (bilinear) and
center-cropped, as the reference's ``Resize`` + ``CenterCrop``; then mapped to [-1, 1] and
encoded to latents with the model's VAE (``latent_dist.sample()`` times the VAE's scaling factor,
after its shift factor, as diffusers' trainers; a model without a VAE, like the digits model,
works on the pixels themselves).

    P  pairs of an epoch (this process)   (C, H, W)  the model's latent shape
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowrl.errors import ConfigError


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path


def load_pairs(path: str | Path, check_images: bool = True) -> list[Pair]:
    """The pairs of a JSONL file (see the module docstring); a malformed line raises a ConfigError
    naming the file, the line and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"train.pairs: no file {path}; give a JSONL file of preference pairs, one "
            '{"prompt": ..., "chosen": ..., "rejected": ...} per line (see flowrl.data.pairs)'
        )
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"train.pairs: {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(row, dict):
            raise ConfigError(
                f'{where} is not a JSON object; write {{"prompt": ..., "chosen": ..., "rejected": ...}}'
            )
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(
                f"{where} lacks the string key(s) {missing}; every line needs prompt, chosen and rejected"
            )
        images = []
        for key in ("chosen", "rejected"):
            p = Path(row[key]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            if check_images and not p.is_file():
                raise ConfigError(
                    f"{where}: {key} image {p} does not exist (paths are relative to the file's folder)"
                )
            images.append(p)
        pairs.append(Pair(row["prompt"], *images))
    if not pairs:
        raise ConfigError(f"train.pairs: {path} holds no pairs; write one JSON object per line")
    return pairs


def write_pairs(path: str | Path, rows: list[tuple[str, Tensor, Tensor]]) -> Path:
    """Write ``(prompt, chosen image, rejected image)`` rows, images (C, H, W) in [0, 1], as PNGs
    beside a JSONL file in this module's format (what the tests' fixture and a user's export do)."""
    from PIL import Image

    path = Path(path)
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, chosen, rejected) in enumerate(rows):
        names = []
        for tag, img in (("w", chosen), ("l", rejected)):
            arr = (img.detach().float().clamp(0, 1) * 255).round().byte().cpu()
            arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
            name = f"images/{i:05d}_{tag}.png"
            Image.fromarray(arr).save(path.parent / name)
            names.append(name)
        lines.append(json.dumps({"prompt": prompt, "chosen": names[0], "rejected": names[1]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def image_size(adapter) -> int:
    """The pixel size the model's latents decode to (the VAE's downsampling, or 1 without one)."""
    vae = getattr(adapter, "vae", None)
    side = adapter.latent_shape[-1]
    if vae is None:
        return side
    return side * 2 ** (len(vae.config.block_out_channels) - 1)


def read_image(path: Path, size: int, channels: int) -> Tensor:
    """(channels, size, size) in [0, 1]: RGB (or grayscale for one channel), shorter side resized to
    ``size`` (bilinear), center-cropped."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)


@torch.no_grad()
def encode_images(adapter, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, C, H, W) latents of images (B, c, h, w) in [0, 1]: the VAE's posterior sample times its
    scaling factor (after its shift factor), or the pixels in [-1, 1] for a model without a VAE."""
    x = images.to(adapter.device, torch.float32) * 2 - 1
    vae = getattr(adapter, "vae", None)
    if vae is None:
        latents = x
    else:
        dist = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((z - shift) * vae.config.scaling_factor).float()
    if tuple(latents.shape[1:]) != tuple(adapter.latent_shape):
        raise ConfigError(
            f"train.pairs: images encode to latents of shape {tuple(latents.shape[1:])}, but the model samples "
            f"{tuple(adapter.latent_shape)}; Diffusion-DPO from a pairs file needs a model whose latents are the "
            "VAE's own (sd, sdxl families)"
        )
    return latents


class PairSource:
    """An epoch's pairs for the text-to-image collector when ``train.pairs`` is set: each epoch
    draws ``sample_batch_size x num_batches_per_epoch`` pairs per process (a permutation of the file
    per pass over it, seeded by (seed, pass); each process its own share), encodes both images
    and returns a Chain with one row per pair: ``latents`` (P, 1, C, H, W) the chosen image's latents,
    ``metadata["rejected"]`` (P, C, H, W) the rejected one's, the prompts' condition, no steps."""

    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run
        self.pairs = load_pairs(cfg.train.pairs)
        self.size = image_size(run.adapter)
        self.channels = (
            1 if getattr(run.adapter, "vae", None) is None and run.adapter.latent_shape[0] == 1 else 3
        )

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's pair indices for the epoch: consecutive slices of per-pass permutations."""
        t, run = self.cfg.train, self.run
        per_rank = t.sample_batch_size * t.num_batches_per_epoch
        total, n = per_rank * run.world, len(self.pairs)
        start = epoch * total + run.rank * per_rank
        out = []
        for i in range(start, start + per_rank):
            p, j = divmod(i, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed * 1_000_003 + p))
            out.append(int(perm[j]))
        return out

    def collect(self, epoch: int):
        from flowrl.chain import Chain
        from flowrl.core import seeding

        run = self.run
        idx = self.epoch_indices(epoch)
        pairs = [self.pairs[i] for i in idx]
        gen = run.seeds.generator(epoch, seeding.SAMPLE)
        read = [read_image(p.chosen, self.size, self.channels) for p in pairs]
        read += [read_image(p.rejected, self.size, self.channels) for p in pairs]
        latents = encode_images(run.adapter, torch.stack(read), gen)
        P = len(pairs)
        prompts = [p.prompt for p in pairs]
        gs = self.cfg.sampler.guidance_scale
        cond = run.adapter.condition(prompts, gs)
        empty = torch.zeros(P, 0, dtype=torch.long, device=run.device)
        chain = Chain(
            latents=latents[:P, None],
            timesteps=empty,
            next_timesteps=empty.clone(),
            log_probs=torch.zeros(P, 0, device=run.device),
            cond=cond,
            prompts=prompts,
            guidance_scale=gs,
            rewards=torch.zeros(P, device=run.device),
        )
        chain.metadata["rejected"] = latents[P:]
        chain.metadata["pair_index"] = torch.tensor(idx)
        chain.metadata["group"] = torch.arange(P, device=run.device) + P * run.rank
        chain.metadata["reward_terms"] = {}
        return chain, {"pairs": P * run.world}


__all__ = ["Pair", "PairSource", "encode_images", "load_pairs", "read_image", "sample_pairs", "write_pairs"]


@torch.no_grad()
def sample_pairs(adapter, sampler, prompts: list[str], per_prompt: int, reward, generator: torch.Generator):
    """AI-feedback pairs made by the model itself: ``per_prompt`` samples of each prompt, ranked by
    ``reward`` (a :class:`~flowrl.rewards.Reward`), best against worst, second against second
    worst, ...; returns ``(prompt, chosen image, rejected image)`` rows for :func:`write_pairs`."""
    rows = []
    for prompt in prompts:
        chain = sampler.sample(adapter, [prompt] * per_prompt, 1.0, generator=generator)
        images = adapter.decode(chain.latents[:, -1]).cpu()
        scores, _ = reward(images, [prompt] * per_prompt)
        order = torch.argsort(-scores.cpu().double(), stable=True).tolist()
        for i in range(per_prompt // 2):
            rows.append((prompt, images[order[i]], images[order[-1 - i]]))
    return rows


def digits_pairs(path: str | Path, per_digit: int = 8, seed: int = 0, num_steps: int = 10) -> Path:
    """The digits demo's pairs file (tasks/digits_dpo.yaml): ``per_digit`` DDIM(eta 1) samples of
    each digit prompt, ranked by the ``digit_alignment`` reward (the digit classifier)."""
    from flowrl.demo.digits import digit_prompt, load_digits_pipeline
    from flowrl.models.sd import StableDiffusionAdapter
    from flowrl.rewards import Reward
    from flowrl.samplers.ddim import DDIMSampler

    pipe = load_digits_pipeline(progress=False)
    adapter = StableDiffusionAdapter(pipe, finetune="frozen")
    sampler = DDIMSampler(pipe.scheduler.config, num_steps, 1.0)
    reward = Reward([{"name": "digit_alignment"}])
    prompts = [digit_prompt(d) for d in range(10)]
    rows = sample_pairs(adapter, sampler, prompts, per_digit, reward, torch.Generator().manual_seed(seed))
    reward.close()
    return write_pairs(path, rows)
