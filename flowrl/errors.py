"""flowrl's own error types, and the "did you mean" every message about a name offers.

Every error a user can cause (a task file, an override, an option, a file or folder they gave, a
reward script, a run folder in use) is a :class:`FlowrlError`: the CLI prints its message as one
``flowrl: error:`` line, exit code 2, and the message names the cause and the fix. Any other
exception is a bug in flowrl and keeps its traceback. Each type also derives from the builtin
exception it replaced (``ValueError``, ``FileNotFoundError``, ...), so code that caught those
still does.
"""


class FlowrlError(Exception):
    """A user's mistake (never a bug in flowrl); the message names the cause and the fix."""


class ConfigError(FlowrlError, ValueError):
    """A task file, override or option is wrong; the message names the key and the fix."""


class InputError(FlowrlError, ValueError):
    """A file or folder the user gave is unreadable, corrupt or of the wrong kind."""


class MissingFileError(FlowrlError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunFolderLockedError(FlowrlError, RuntimeError):
    """Another live process is writing the run folder."""


class NonFiniteError(FlowrlError, FloatingPointError):
    """A sample, reward, advantage, loss, gradient or updated weight went NaN/inf; the update was
    not applied (or, for the weights, not saved)."""


def one_line(message: str) -> str:
    """A message as one line: its lines joined with ``; `` (YAML and OS messages span several)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def suggest(key: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to ``key``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_text(path, what: str) -> str:
    """A text file the user gave, as UTF-8; an unreadable or non-UTF-8 file is an InputError naming
    ``what`` (e.g. ``"task file"``) and the fix."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder; give a file") from None
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist; check the path") from None
    except PermissionError:
        raise InputError(f"{what} {path} cannot be read (permission denied); check its permissions") from None


def read_json(path, what: str):
    """A JSON file the user gave (or one flowrl wrote that may be truncated); a broken one is an
    InputError naming ``what`` and the fix."""
    import json

    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "repair or replace it (a truncated file: copy it again)"
        ) from None


def load_weights(path, what: str, device: str = "cpu") -> dict:
    """A safetensors file flowrl wrote (a checkpoint's, a policy's); a missing, truncated or corrupt
    one is an error naming ``what`` and the fix, not safetensors' own exception."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"{what} {path} is missing; the folder is incomplete: copy it again or use another"
        )
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors' SafetensorError, a header that is not JSON, a short file
        raise InputError(
            f"{what} {path} is truncated or corrupt ({type(e).__name__}: {one_line(e)}); copy it again, "
            "or use another checkpoint"
        ) from None
