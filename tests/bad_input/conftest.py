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
