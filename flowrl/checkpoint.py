"""Atomic, safe checkpoints: safetensors for weights, ``torch.load(weights_only=True)`` for the
optimizer state, JSON for counters and reward statistics.

A checkpoint is a folder ``checkpoints/epoch_000010`` written under a temporary name and
renamed when complete, so a crash never leaves a folder that looks complete:

    trainable.safetensors            the trained parameters (LoRA or full UNet), float32
    ema.safetensors                  their EMA (when train.ema)
    optimizer.pt                     the optimizer state dict (tensors and numbers only)
    state.json                       next epoch, global step, reward-statistic buffers
    pytorch_lora_weights.safetensors LoRA in diffusers format (pipeline.load_lora_weights)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^epoch_(\d+)$")


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    ema: dict[str, torch.Tensor] | None = None,
    extra_writer=None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically and return its folder. ``extra_writer(folder)`` may add files
    (e.g. the diffusers-format LoRA) before the rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in trainable.items()},
        str(tmp / "trainable.safetensors"),
    )
    if ema is not None:
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors")
        )
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if extra_writer is not None:
        extra_writer(tmp)
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    if keep is not None and keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint folder written by :func:`save_checkpoint` (safe loading only)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete flowrl checkpoint (no state.json); give a folder under "
            "<run>/checkpoints/ or train.resume=auto"
        )
    out = {
        "trainable": load_file(str(folder / "trainable.safetensors"), device=str(map_location)),
        "optimizer": torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True),
        "state": json.loads((folder / "state.json").read_text()),
        "ema": None,
    }
    if (folder / "ema.safetensors").is_file():
        out["ema"] = load_file(str(folder / "ema.safetensors"), device=str(map_location))
    return out
