"""Crash safety: real `flowrl train` processes are SIGKILLed at several points, including in the
middle of writing a checkpoint, and resumed with ``train.resume=auto``; the final weights must be
bit-identical to an uninterrupted run with the same seed, and a half-written checkpoint (a
``.tmp-*`` folder) must never be picked up.

Exact crash points come from the ``FLOWRL_TEST_CRASH_AT`` hook of flowrl.checkpoint
(``save:<n>``: SIGKILL after checkpoint n's weights file is written, before the rest;
``saved:<n>``: SIGKILL right after checkpoint n is renamed into place); the others kill the process
from outside once a given checkpoint has appeared, i.e. somewhere in the next epoch.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.checkpoint import checkpoint_dirs, latest_checkpoint
from flowrl.config import load_config
from flowrl.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL

T2I = [
    "model.finetune=lora",
    "sampler.num_steps=3",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=4",
    "train.eval_every=0",
    "train.save_every=1",
    "train.num_epochs=4",
    "optim.learning_rate=1e-2",
    "algorithm.clip_range=1e-2",
    "algorithm.stat_min_count=2",  # per-prompt statistics kick in, so their buffers must resume too
]
ROBOT_TASK = "tasks/robot_inverted_pendulum_reinflow.yaml"
ROBOT = [
    "pretrain.steps=30",
    "pretrain.eval_episodes=0",
    "demos.num_episodes=2",
    "train.num_epochs=4",
    "env.n_steps=8",
    "env.num_envs=2",
    "train.eval_every=0",
    "env.eval_episodes=1",
    "train.save_every=1",
    "train.minibatch_size=16",
]


def _env(crash_at: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("FLOWRL_TEST_CRASH_AT", None)
    if crash_at:
        env["FLOWRL_TEST_CRASH_AT"] = crash_at
    return env


def _cmd(task: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "flowrl.cli", "train", str(REPO / task), *overrides]


def _run(task, overrides, crash_at=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(task, overrides), env=_env(crash_at), cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _run_and_kill_after(task, overrides, folder: Path) -> tuple[int, str]:
    """Start a run and SIGKILL it from outside as soon as ``folder`` (a checkpoint) exists."""
    proc = subprocess.Popen(
        _cmd(task, overrides),
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not folder.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if not k.startswith(("time_", "samples_per_s", "env_steps_per_s"))}
        for r in rows
    ]


def _half_written(run: Path) -> list[Path]:
    return [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_text_to_image_run_survives_kills(tmp_path):
    common = [*T2I, f"train.output_dir={tmp_path}"]
    ref = _run("tasks/jpeg_tiny.yaml", [*common, "train.run_name=straight"])
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "crashy"
    flags = [*common, "train.run_name=crashy"]
    # 1. killed while writing checkpoint 2: only its weights file exists, under a temporary name
    p = _run("tasks/jpeg_tiny.yaml", flags, crash_at="save:2")
    assert p.returncode == KILLED, p.stderr[-3000:]
    (tmp,) = _half_written(run)
    assert tmp.name.startswith(".tmp-epoch_000002-") and not (tmp / "state.json").exists()
    assert [c.name for c in checkpoint_dirs(run)] == ["epoch_000001"]
    # even a temporary folder that looks complete, or an epoch_* folder without state.json, is
    # never taken for a checkpoint
    shutil.copytree(run / "checkpoints/epoch_000001", run / "checkpoints/.tmp-epoch_000009-999999999")
    (run / "checkpoints/epoch_000008").mkdir()
    (run / "checkpoints/epoch_000008/trainable.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(run).name == "epoch_000001"

    # 2. resumed from checkpoint 1, killed from outside somewhere in epoch 4 (after checkpoint 3)
    rc, out = _run_and_kill_after(
        "tasks/jpeg_tiny.yaml", [*flags, "train.resume=auto"], run / "checkpoints/epoch_000003"
    )
    assert rc == KILLED, out[-3000:]
    assert "at epoch 1" in out  # resumed from epoch_000001, not from a half-written folder
    shutil.rmtree(run / "checkpoints/epoch_000008")

    # 3. resumed from checkpoint 3, killed right after the final checkpoint is renamed into place
    p = _run("tasks/jpeg_tiny.yaml", [*flags, "train.resume=auto"], crash_at="saved:4")
    assert p.returncode == KILLED, p.stderr[-3000:]
    assert "at epoch 3" in p.stdout + p.stderr
    assert not _half_written(run)  # the crashed writers' temporary folders were cleaned up

    _assert_same_weights(tmp_path / "straight/checkpoints/epoch_000004", run / "checkpoints/epoch_000004")
    ref_rows, rows = _metrics(tmp_path / "straight"), _metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]  # the evaluation before training, then 4 epochs
    assert rows == ref_rows  # rewards, losses, KL, grad norms: the same run


@pytest.mark.slow
def test_robot_run_survives_kills(tmp_path):
    common = [*ROBOT, f"train.output_dir={tmp_path}"]
    # the BC policy, in this process: both runs below start from the same file
    pretrain(load_config(ROBOT_TASK, common), Path(ROBOT_TASK).stem, progress=False)
    ref = _run(ROBOT_TASK, [*common, "train.run_name=straight"])
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "crashy"
    flags = [*common, "train.run_name=crashy"]
    p = _run(ROBOT_TASK, flags, crash_at="save:2")
    assert p.returncode == KILLED, p.stderr[-3000:]
    (tmp,) = _half_written(run)
    assert tmp.name.startswith(".tmp-epoch_000002-") and not (tmp / "state.json").exists()
    assert latest_checkpoint(run).name == "epoch_000001"

    rc, out = _run_and_kill_after(ROBOT_TASK, [*flags, "train.resume=auto"], run / "checkpoints/epoch_000003")
    assert rc in (KILLED, 0), out[-3000:]  # an iteration takes a fraction of a second: it may finish
    assert "at epoch 1" in out

    p = _run(ROBOT_TASK, [*flags, "train.resume=auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert not _half_written(run)
    _assert_same_weights(tmp_path / "straight/checkpoints/epoch_000004", run / "checkpoints/epoch_000004")
    assert _metrics(run) == _metrics(tmp_path / "straight")


@pytest.mark.parametrize("point", ["save", "saved"])
def test_crash_hook_is_inert_without_the_variable(tmp_path, monkeypatch, point):
    """The hook fires only on its exact value; the writer leaves no temporary folder behind."""
    from flowrl.checkpoint import save_checkpoint

    monkeypatch.setenv("FLOWRL_TEST_CRASH_AT", f"{point}:7")  # another epoch: no crash
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/.tmp-epoch_000001-999999999").mkdir()  # a dead writer's leftovers
    for epoch in (1, 2, 2, 3):  # saving the same epoch twice replaces it
        save_checkpoint(tmp_path, epoch, {"w": torch.full((2,), float(epoch))}, {}, {"e": epoch}, keep=2)
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["epoch_000002", "epoch_000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_000002", "epoch_000003"]


def test_metrics_line_torn_by_a_kill_does_not_block_resume(tmp_path):
    from flowrl.report import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "r": 1}\n{"epoch": 1, "r": 2}\n{"epoch": 2, "r"')  # killed mid-line
    writer = MetricsWriter(path, truncate_from_epoch=2)
    writer.write({"epoch": 2, "r": 3})
    assert [r["epoch"] for r in writer.rows()] == [0, 1, 2]
    assert not list(tmp_path.glob("*.tmp"))
