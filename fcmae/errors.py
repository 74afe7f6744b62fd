"""Errors a user can cause and fix: the CLI prints them as one sentence, without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


class ConfigError(UserError):
    """A configuration key is unknown or has a value of the wrong type or range."""
