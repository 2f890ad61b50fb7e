"""What a person opens: JSONL metrics, a reward-curve PNG, labelled image grids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: str | os.PathLike, truncate_from_epoch: int | None = None):
        self.path = Path(path)
        if truncate_from_epoch is not None and self.path.exists():
            # on resume, drop rows of epochs that will be re-run (and a line torn by a crash), then
            # swap the file in atomically so a second crash cannot lose the rows kept
            keep = [json.dumps(r) for r in self.rows() if r.get("epoch", -1) < truncate_from_epoch]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for ln in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:  # blank, or the last line of a process killed while writing it
                continue
        return rows


def plot_reward_curve(
    rows: list[dict], path: str | os.PathLike, x_key: str = "epoch", title: str = "reward"
) -> None:
    """Mean reward (with +/- 1 std band) against epochs, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "reward_mean" in r]
    if not rows:
        return
    x = np.array([r[x_key] for r in rows])
    mean = np.array([r["reward_mean"] for r in rows])
    std = np.array([r.get("reward_std", 0.0) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(x, mean, marker="o", ms=3, label="mean reward of training samples")
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, label="+/- 1 std")
    ax.set_xlabel(x_key)
    ax.set_ylabel("reward")
    finish_plot(fig, ax, title, path)


def finish_plot(fig, ax, title: str, path: str | os.PathLike) -> None:
    """Title, grid and legend, then write the figure as a PNG atomically (a reader of ``path``
    never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def image_grid(
    images: torch.Tensor, labels: list[str] | None = None, ncol: int | None = None, scale: int | None = None
) -> Image.Image:
    """A PIL grid of (B, C, H, W) images in [0, 1] (C = 3 or 1), each upscaled to at least 128 px,
    with labels."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    B, H, W, _ = arr.shape
    scale = scale or max(1, math.ceil(128 / max(H, W)))
    ncol = ncol or min(B, 8)
    nrow = math.ceil(B / ncol)
    cell_w, cell_h = W * scale, H * scale
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (ncol * cell_w, nrow * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i]).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (c * cell_w, r * (cell_h + label_h) + label_h))
        if labels:
            draw.text((c * cell_w + 2, r * (cell_h + label_h) + 1), labels[i][: cell_w // 6], fill="black")
    return grid


def log_sample_images(
    trackers, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor, step: int, n: int = 4
):
    """The first ``n`` of (B, C, H, W) images in [0, 1] with "prompt | reward" captions (ddpo-pytorch's)
    on accelerate's trackers: TensorBoard, whose images take no caption, gets them as one grid with
    the captions drawn in (tag ``samples``) and as text (``samples_captions``); W&B as captioned
    ``wandb.Image`` s under ``samples``. Other trackers: nothing."""
    n = min(n, len(images))
    captions = [f"{p[:40]} | {r:.4g}" for p, r in zip(prompts[:n], rewards[:n].float().tolist())]
    for tracker in trackers:
        if tracker.name == "tensorboard":
            grid = np.asarray(image_grid(images[:n], captions, ncol=n))  # (H, W, 3) uint8
            tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
            tracker.log({"samples_captions": "\n\n".join(captions)}, step=step)
        elif tracker.name == "wandb":
            import wandb

            pixels = (images[:n].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, C)
            pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels  # grayscale: (n, H, W)
            tracker.log(
                {"samples": [wandb.Image(p, caption=c) for p, c in zip(pixels, captions)]},
                step=step,
            )


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, labels: list[str] | None = None, ncol: int | None = None
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image_grid(images, labels, ncol).save(tmp)
    os.replace(tmp, path)
