"""Errors a user can cause and fix: the CLI prints them as one sentence, without a traceback;
and how such a sentence quotes the user's input (``shorten``, ``cut``)."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


class ConfigError(UserError):
    """A configuration key is unknown or has a value of the wrong type or range."""


def shorten(value: Any, limit: int = 80) -> str:
    """repr(value), cut to limit characters: a message quotes no huge input whole."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = 200) -> str:
    """text, or its start and "..." within limit characters."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
