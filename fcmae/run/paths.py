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


def _relation(output: str, source: str) -> str | None:
    """How output overlaps source, both resolved, in words; None when apart, or when either
    names no local path (a URL, a Hub name)."""
    if not (os.path.isabs(output) and os.path.isabs(source)):
        return None
    try:
        same = output == source or os.path.samefile(output, source)  # hard links too
    except OSError:  # one of them does not exist (yet)
        same = False
    if same:
        return "is the same file or folder as"
    if output.startswith(source.rstrip(os.sep) + os.sep):
        return "lies inside"
    if source.startswith(output.rstrip(os.sep) + os.sep):
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
