"""A command's paths: each option's value resolved once, when the configuration is made, and the
one rule for what a command writes against what it reads.

Torch-free: the CLI and the configuration import it.

    resolved("small")                      # "/home/me/data/small", links followed
    check_outputs({"--output-dir": out}, {"--data": data})   # ConfigError when they overlap
"""

from __future__ import annotations

import os

from fcmae.errors import ConfigError
from fcmae.weights.hub import hub_name


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def resolved(text: str, hub: bool = True) -> str:
    """text, the value of a path option, made absolute with links followed (and ~ expanded).

    What names no local path stays as it is: a URL (``://``), a ``pipe:`` command and, with
    hub (inputs; never an output), a Hub name such as timm/convnextv2_tiny.fcmae that is not
    an existing path. A WebDataset brace pattern keeps its pattern: the folder before the
    first ``{`` is resolved."""
    if "://" in text or text.startswith("pipe:") or (hub and hub_name(text)):
        return text
    if "{" in text:
        folder = os.path.dirname(text.partition("{")[0])
        return os.path.join(_real(folder or "."), text[len(folder) :].lstrip(os.sep))
    return _real(text)


def _same(a: str, b: str) -> bool:
    """The same file or folder: the same path, or the same inode (hard links, bind mounts)."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _within(inner: str, outer: str) -> bool:
    """Whether inner lies inside outer: by path, or an existing folder above inner is outer
    (a bind mount of outer, say)."""
    if inner.startswith(outer.rstrip(os.sep) + os.sep):
        return True
    parent = os.path.dirname(inner)
    while parent != os.path.dirname(parent):
        if os.path.isdir(parent) and _same(parent, outer):
            return True
        parent = os.path.dirname(parent)
    return False


def _relation(output: str, source: str) -> str | None:
    """How output overlaps source, both resolved, in words; None when apart, or when either
    names no local path (a URL, a Hub name)."""
    if not (os.path.isabs(output) and os.path.isabs(source)):
        return None
    if _same(output, source):
        return "is the same file or folder as"
    if _within(output, source):
        return "lies inside"
    if _within(source, output):
        return "holds"
    return None


def check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """The one rule, before any work: refuse an output that is, lies inside or holds one of the
    inputs, since writing it would change what the command reads. Both are {flag: path};
    unset values are skipped. ConfigError naming both flags and paths."""
    for flag, output in outputs.items():
        for source_flag, source in inputs.items():
            if output is None or source is None:
                continue
            out, src = resolved(output, hub=False), resolved(source)
            relation = _relation(out, src)
            if relation:
                raise ConfigError(
                    f"{flag} {out} {relation} {source_flag} {src}, which this command reads; "
                    f"pass another {flag}, apart from {source_flag}."
                )
