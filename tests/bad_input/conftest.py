"""Helpers of the bad-input corpus: every case is an in-process call of ``flowrl.cli.main(argv)``
(no subprocess, so the corpus runs in seconds) that must end with exit code 2, one
``flowrl: error:`` line naming the cause, and nothing left behind in the output folder."""

import re
from pathlib import Path

import pytest

from flowrl.cli import main

REPO = Path(__file__).resolve().parents[2]
TASK = str(REPO / "tasks/jpeg_tiny.yaml")
ROBOT_TASK = str(REPO / "tasks/robot_inverted_pendulum_reinflow.yaml")
PROGRESS = re.compile(r"^[\w ]+:\s+\d+%\|")  # a progress bar's redraws (stderr), not a message

# one epoch of 2 samples of 8x8 pixels, 2 denoising steps: the smallest run that calls everything
TINY = [
    "train.num_epochs=1",
    "train.sample_batch_size=2",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=2",
    "sampler.num_steps=2",
    "train.eval_every=0",
    "train.save_every=0",
    "train.eval_prompts=[a]",
    "model.tiny_image_size=8",
    "algorithm.stat_min_count=1",
    "train.torch_threads=1",
]


def train(out: Path, *extra) -> list[str]:
    """``flowrl train`` of the tiny SD task into ``out``, with ``extra`` overrides."""
    return ["train", TASK, f"train.output_dir={out}", "train.run_name=r", *extra]


def write(path: Path, text: str | bytes) -> str:
    """Write ``text`` (or bytes) to ``path``, its folders made; returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def leftovers(folder: Path) -> list[str]:
    """What a failed command left in its output folder (nothing, for every case)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def refuse(capsys):
    """``refuse(argv, cause, out=None)``: the command exits 2 with one error line containing
    ``cause``, no traceback, and leaves ``out`` (a folder) empty or absent."""

    def check(argv: list[str], cause: str, out: Path | None = None) -> str:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = [
            ln
            for ln in err.replace("\r", "\n").splitlines()
            if ln.strip() and not ln.startswith("flowrl: warning:") and not PROGRESS.match(ln)
        ]
        assert rc == 2, (rc, err)
        assert len(lines) == 1 and lines[0].startswith("flowrl: error: "), err
        assert "Traceback" not in err, err
        assert cause in lines[0], (cause, lines[0])
        if out is not None:
            assert leftovers(out) == [], leftovers(out)
        return lines[0]

    return check
