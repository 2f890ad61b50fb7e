"""flowrl's own error types. A :class:`ConfigError` is a user's mistake: the CLI prints its message
as one ``flowrl: error:`` line, and the message names the cause and the fix."""


class ConfigError(ValueError):
    """A task file, override or option is wrong; the message names the key and the fix."""


class NonFiniteError(FloatingPointError):
    """A sample, reward, advantage, loss or gradient went NaN/inf; the update was not applied."""
