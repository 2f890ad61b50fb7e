"""flowrl's own error types, and the "did you mean" every message about a name offers. A :class:`ConfigError` is a user's mistake: the CLI prints its message
as one ``flowrl: error:`` line, and the message names the cause and the fix."""


class ConfigError(ValueError):
    """A task file, override or option is wrong; the message names the key and the fix."""


class NonFiniteError(FloatingPointError):
    """A sample, reward, advantage, loss or gradient went NaN/inf; the update was not applied."""


def suggest(key: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to ``key``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
