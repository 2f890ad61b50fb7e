"""The CLI's one error boundary: a user's mistake is one line and exit 2, whatever raised it; a
bug in flowrl keeps its traceback, asks to be reported and exits 1."""

import errno

import pytest

import flowrl.cli
from flowrl.errors import ConfigError, FlowrlError, InputError, MissingFileError, NonFiniteError
from flowrl.rewards import RewardError

from .conftest import TASK


def test_flowrl_errors_share_one_base_and_keep_their_builtins():
    for cls, builtin in [
        (ConfigError, ValueError),
        (InputError, ValueError),
        (MissingFileError, FileNotFoundError),
        (NonFiniteError, FloatingPointError),
        (RewardError, RuntimeError),
    ]:
        assert issubclass(cls, FlowrlError) and issubclass(cls, builtin)


def test_a_bug_keeps_its_traceback_and_exits_1(monkeypatch, capsys):
    def bug(args):
        raise ZeroDivisionError("a bug in flowrl")

    monkeypatch.setattr(flowrl.cli, "_train", bug)
    parser = flowrl.cli.build_parser
    monkeypatch.setattr(flowrl.cli, "build_parser", lambda: _with(parser(), "train", bug))
    rc = flowrl.cli.main(["train", TASK])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError: a bug in flowrl" in err
    assert "this is a bug in flowrl" in err.splitlines()[-1]


def _with(parser, command, func):
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices[command].set_defaults(func=func)
    return parser


@pytest.mark.parametrize(
    "exc, cause",
    [
        (
            NonFiniteError("non-finite rewards at epoch 3: the update was not applied"),
            "non-finite rewards at epoch 3",
        ),
        (RewardError("reward 'x' raised ValueError: bad"), "reward 'x' raised ValueError"),
        (InputError("first line\nsecond line"), "first line; second line"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/x"),
            "No space left on device: /out/x; the disk is full",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/out"),
            "Permission denied: /out; permission denied",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro"), "the file system is read-only"),
        (MemoryError(), "out of memory"),
    ],
    ids=["nonfinite", "reward", "multiline", "disk-full", "permission", "read-only", "memory"],
)
def test_user_errors_from_anywhere_are_one_line(monkeypatch, refuse, exc, cause):
    def raises(args):
        raise exc

    parser = flowrl.cli.build_parser
    monkeypatch.setattr(flowrl.cli, "build_parser", lambda: _with(parser(), "train", raises))
    refuse(["train", TASK], cause)


def test_interrupt_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = flowrl.cli.build_parser
    monkeypatch.setattr(flowrl.cli, "build_parser", lambda: _with(parser(), "train", interrupted))
    assert flowrl.cli.main(["train", TASK]) == 130
    assert capsys.readouterr().err.strip() == "flowrl: interrupted"


def test_help_exits_0(capsys):
    assert flowrl.cli.main(["train", "--help"]) == 0
    assert "usage: flowrl train" in capsys.readouterr().out
