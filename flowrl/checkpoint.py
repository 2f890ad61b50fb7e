"""Atomic, safe checkpoints: safetensors for weights, ``torch.load(weights_only=True)`` for the
optimizer state, JSON for counters and reward statistics.

A checkpoint is a folder ``checkpoints/epoch_000010`` written under a temporary name and
renamed when complete, so a crash never leaves a folder that looks complete:

    trainable.safetensors            the trained parameters (LoRA or full UNet), float32
    ema.safetensors                  their EMA (when train.ema)
    optimizer.pt                     the optimizer state dict (tensors and numbers only)
    state.json                       next epoch, global step, reward-statistic buffers
    config.yaml                      the config it was trained with (a resume compares its own with it)
    pytorch_lora_weights.safetensors LoRA in diffusers format (pipeline.load_lora_weights)

Only folders named ``epoch_<n>`` that hold ``state.json`` (written last) count as checkpoints;
temporary folders (``.tmp-*``) left by a crashed writer are ignored and removed by the next save.

Test hook: ``FLOWRL_TEST_CRASH_AT=save:<n>`` makes the process SIGKILL itself in the middle of
writing checkpoint ``n`` (after its weights file, before the rest), ``saved:<n>`` right after
checkpoint ``n`` is renamed into place (before old checkpoints are pruned). tests/test_crash_resume.py
uses it to crash at exact points; never set it otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowrl.errors import InputError, MissingFileError, load_weights, one_line, read_json

CHECKPOINT_RE = re.compile(r"^epoch_(\d+)$")
TMP_PREFIX = ".tmp-"
TMP_RE = re.compile(r"^\.tmp-.*-(\d+)$")  # .tmp-<what>-<pid of the writer>


def _crash_point(where: str, epoch: int) -> None:
    """The FLOWRL_TEST_CRASH_AT test hook (see the module docstring): SIGKILL this process."""
    if os.environ.get("FLOWRL_TEST_CRASH_AT") == f"{where}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temp(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint folders whose writer is no longer running; return them."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = []
    for p in root.iterdir():
        m = TMP_RE.match(p.name)
        if p.is_dir() and p.name.startswith(TMP_PREFIX) and (m is None or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    return stale


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    remove_stale_temp(run_dir)  # left by a writer that crashed
    final = root / f"epoch_{epoch:06d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().float().contiguous().cpu() for k, v in trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        _crash_point("save", epoch)
        if ema is not None:
            save_file(
                {k: v.detach().float().contiguous().cpu() for k, v in ema.items()},
                str(tmp / "ema.safetensors"),
            )
        torch.save(optimizer_state, tmp / "optimizer.pt")
        if extra_writer is not None:
            extra_writer(tmp)
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:  # a full disk, an unwritable file: no temporary folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # an existing folder of that name is moved aside (to a temporary name, ignored by resume) and
    # deleted only once the new one is in place, so some complete checkpoint exists at every instant
    old = None
    if final.exists():
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _crash_point("saved", epoch)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep is not None and keep > 0:
        for stale in checkpoint_dirs(run_dir)[:-keep]:
            # renamed first, so a crash halfway through the deletion leaves no partial epoch_* folder
            doomed = root / f"{TMP_PREFIX}del-{stale.name}-{os.getpid()}"
            os.rename(stale, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint folder written by :func:`save_checkpoint` (safe loading only). Weights go
    to ``map_location``; the optimizer state stays on the CPU, where ``load_state_dict`` wants it:
    it moves the moments to each parameter's device itself and keeps Adam's step counters on the
    CPU (counters on a GPU would cost a host sync per parameter per step)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise MissingFileError(
            f"{folder} is not a complete flowrl checkpoint (no state.json); give a folder under "
            "<run>/checkpoints/ or train.resume=auto"
        )
    state = read_json(folder / "state.json", "checkpoint state")
    if not isinstance(state, dict) or "next_epoch" not in state:
        raise InputError(f"checkpoint state {folder}/state.json holds no next_epoch; use another checkpoint")
    out = {
        "trainable": load_weights(folder / "trainable.safetensors", "checkpoint weights", map_location),
        "optimizer": _load_optimizer(folder / "optimizer.pt"),
        "state": state,
        "ema": None,
    }
    if (folder / "ema.safetensors").is_file():
        out["ema"] = load_weights(folder / "ema.safetensors", "checkpoint EMA weights", map_location)
    return out


def _load_optimizer(path: Path) -> dict:
    """The optimizer state (``weights_only``: tensors and numbers only); a truncated, corrupt or
    unsafe file is an InputError naming it."""
    if not path.is_file():
        raise MissingFileError(f"checkpoint optimizer state {path} is missing; use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a short zip, a pickle of something else (refused by weights_only)
        raise InputError(
            f"checkpoint optimizer state {path} is truncated, corrupt or not tensors-only "
            f"({type(e).__name__}: {one_line(e)[:200]}); use another checkpoint"
        ) from None
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise InputError(
            f"checkpoint optimizer state {path} is not an optimizer state dict; use another checkpoint"
        )
    return state
