"""A run folder is written by one process at a time, is not left half-made, and is resumed only
with the config it was trained with.

- :class:`RunFolder` takes ``<run>/.flowrl.lock`` (created with ``O_EXCL``, holding the writer's
  pid and host) before a run writes anything; a second writer gets one clear error. A lock left by
  a process that is gone (kill -9, a crash) is taken over with a warning; one held by this very
  process (a notebook or a test building a second Run) is taken over silently. The lock is removed
  when the run ends, and at exit.
- A run that fails before it finished an epoch or wrote a checkpoint removes the run folder it
  created (no folder holding only ``config.yaml`` and the epoch-0 evaluation).
- :func:`resume_changes` lists the keys (against the checkpoint's ``config.yaml``) whose change breaks a resumed run's exactness: every key
  but those in :data:`FREE_ON_RESUME` (``train.num_epochs`` only with a constant learning rate,
  whose schedule does not depend on the run's length).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
from pathlib import Path

from flowrl.errors import RunFolderLockedError

LOCK_NAME = ".flowrl.lock"

# keys a resumed run may change without changing what it computes: where and how often it logs,
# evaluates and saves, how long it runs (see resume_changes), the resume options themselves
FREE_ON_RESUME = {
    "description",
    "reward_timeout",
    "train.num_epochs",
    "train.resume",
    "train.resume_allow_changes",
    "train.output_dir",
    "train.run_name",
    "train.log_with",
    "train.eval_every",
    "train.eval_prompts",
    "train.eval_batch_size",
    "train.save_every",
    "train.keep_checkpoints",
    "train.torch_threads",
    "train.skip_memory_check",
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


class RunFolder:
    """The lock and clean-up of one run folder (the main process's; other ranks hold nothing)."""

    def __init__(self, folder: Path, main: bool = True):
        self.folder, self.main = Path(folder), main
        self.lock = self.folder / LOCK_NAME
        self.created = False
        self.held = False

    def acquire(self) -> None:
        if not self.main:
            return
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # removed meanwhile, or unreadable: try again
                    continue
                pid, host = owner
                if pid == os.getpid() and host == socket.gethostname():
                    self.lock.unlink(missing_ok=True)  # this process's own earlier Run
                    continue
                if host == socket.gethostname() and not _pid_alive(pid):
                    print(
                        f"flowrl: warning: run folder {self.folder} was locked by process {pid}, which is gone "
                        "(it crashed or was killed); taking the lock over",
                        file=sys.stderr,
                    )
                    self.lock.unlink(missing_ok=True)
                    continue
                self.abandon()
                raise RunFolderLockedError(
                    f"run folder {self.folder} is being written by process {pid} on {host} (lock file {self.lock}); "
                    "wait for that run to finish, or choose another train.run_name (delete the lock file only if "
                    "that process is gone)"
                ) from None
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(me)
                self.held = True
                atexit.register(self.release)
                return
        raise RunFolderLockedError(
            f"run folder {self.folder}: could not take the lock {self.lock}; try again"
        )

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.lock.read_text().split()[:2]
            return int(pid), host
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # a half-written lock: its writer died between create and write
            return (-1, socket.gethostname())

    def release(self) -> None:
        if self.held:
            self.held = False
            owner = self._owner()
            if owner is not None and owner[0] == os.getpid():
                self.lock.unlink(missing_ok=True)
            atexit.unregister(self.release)

    def abandon(self, progress: bool = False) -> None:
        """A failed run: release the lock; remove the folder if this run made it and it holds no
        finished epoch (``progress``) and no checkpoint."""
        self.release()
        if not (self.main and self.created) or progress:
            return
        from flowrl.checkpoint import checkpoint_dirs

        if self.folder.exists() and not checkpoint_dirs(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, new: dict) -> list[str]:
    """``key (old -> new)`` for every key whose change breaks exactness (keys the saved config
    lacks, from a newer flowrl, are skipped)."""
    old_flat, new_flat = _flat(saved), _flat(new)
    free = set(FREE_ON_RESUME)
    if new_flat.get("optim.lr_schedule", "constant") != "constant":
        free.discard("train.num_epochs")  # the schedule's length follows the run's
    return [
        f"{k} ({old_flat[k]!r} -> {v!r})"
        for k, v in new_flat.items()
        if k in old_flat and k not in free and old_flat[k] != v
    ]


def saved_config(checkpoint: Path) -> dict | None:
    """The config a checkpoint was trained with: its own config.yaml, else (a checkpoint of an
    older flowrl) its run's."""
    import yaml

    for path in (Path(checkpoint) / "config.yaml", Path(checkpoint).parent.parent / "config.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError):
                return None
            return data if isinstance(data, dict) else None
    return None


def check_resume(cfg, checkpoint: Path) -> list[str]:
    """Refuse to resume ``checkpoint`` with a config that breaks exactness, listing the changed
    keys, unless ``train.resume_allow_changes``; returns the changes allowed."""
    from flowrl.config import config_to_dict
    from flowrl.errors import ConfigError, read_json

    read_json(Path(checkpoint) / "state.json", "checkpoint state")  # a broken one: named here, before loading
    saved = saved_config(checkpoint)
    if saved is None:
        return []
    changes = resume_changes(saved, config_to_dict(cfg))
    if changes and not cfg.train.resume_allow_changes:
        raise ConfigError(
            f"train.resume: the config differs from checkpoint {checkpoint}'s in {', '.join(changes)}; a resumed "
            "run repeats the uninterrupted one exactly only with the same config: undo the change, or pass "
            "--allow-config-change (train.resume_allow_changes=true) to continue with it anyway"
        )
    if changes:
        print(
            f"flowrl: warning: resuming {checkpoint} with changed {', '.join(changes)} "
            "(train.resume_allow_changes): the run is no longer the uninterrupted one's",
            file=sys.stderr,
        )
    return changes
