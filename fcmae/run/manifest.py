"""The files a run wrote: RUN/manifest.json (torch-free).

A run records a file here before it writes it, so a crash between the two leaves a name without
a file (harmless), never a file of the run's that it does not know. Clean-up and pruning touch
only what is recorded; any other file in the directory is the user's and is left alone, and a
run refuses to write over a file of the user's that has the name of one of its own.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from fcmae.errors import UserError
from fcmae.run import layout
from fcmae.run.files import TMP_MARK, write_text_atomic

log = logging.getLogger("fcmae")

# The names a run directory of an fcmae from before manifests holds, adopted once as the run's.
_LEGACY = re.compile(
    rf"{layout.CONFIG}|{layout.IDENTITY}|{layout.LOG}|{layout.METRICS}|{layout.TENSORBOARD}"
    rf"|{layout.RECON}/epoch-\d{{4,}}\.png|{layout.CHECKPOINTS}/\w+-(\d{{4,}}|best)\.pth"
)


class Manifest:
    """The run directory root's record of its own files, as paths relative to root."""

    def __init__(self, root: Path):
        self.root, self.path = root, root / layout.MANIFEST
        self.names: set[str] = set()
        if self.path.exists():
            self.names = self._read()

    def _read(self) -> set[str]:
        try:
            names = json.loads(self.path.read_text())["files"]
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return set(names)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            pass
        raise UserError(
            f"{self.path} cannot be read, so which files of {self.root} the run wrote is "
            f"unknown; restore it, or pass another --output-dir."
        )

    def exists(self) -> bool:
        return self.path.exists()

    def adopt_legacy(self) -> None:
        """A run directory written before manifests: take the files it holds under the names
        fcmae gives its own as the run's (recorded at the next write). A numbered export whose
        checkpoint is not there is left out: it may be the user's, and the clean-up would
        delete it."""
        found = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*")]
        found = [name for name in found if _LEGACY.fullmatch(name)]
        saved = {
            layout.numbered(Path(name).name)
            for name in found
            if layout.numbered(Path(name).name) is not None
        }
        own = []
        for name in found:
            kind = Path(name).name.split("-")[0]
            epoch = layout.numbered(Path(name).name, kind)
            if epoch is None or kind == layout.CHECKPOINT or epoch in saved:
                own.append(name)
        log.info("Recording the %d files of the run in %s as its own.", len(own), self.root)
        self.names.update(own)

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def __contains__(self, path: Path) -> bool:
        return self.name(path) in self.names

    def refuse_foreign(self, path: Path) -> None:
        """UserError when a file is at path (inside root) that the run did not write: the run
        never writes over it."""
        if (path.exists() or path.is_symlink()) and path not in self:
            raise UserError(
                f"{path} is in the way: the run in {self.root} did not write it, and fcmae never "
                f"replaces a file it did not write; move it away, or pass another --output-dir."
            )

    def claim(self, path: Path) -> Path:
        """Record path (inside root) as the run's before it is written (refuse_foreign first)."""
        if path in self:
            return path
        self.refuse_foreign(path)
        self.names.add(self.name(path))
        self.write()
        return path

    def forget(self, path: Path) -> None:
        """Delete path, a file of the run's, and its record."""
        if path in self:
            path.unlink(missing_ok=True)
            self.names.discard(self.name(path))
            self.write()

    def temporaries(self, folder: Path) -> list[Path]:
        """The staging files (fcmae.run.files.temporary_name) of the run's files in folder."""
        if not folder.is_dir():
            return []
        own = {Path(n).name for n in self.names if (self.root / n).parent == folder}
        found = []
        for p in folder.iterdir():
            target, mark, rest = p.name[1:].rpartition(TMP_MARK)
            if (
                p.name.startswith(".")
                and mark
                and target in own
                and re.fullmatch("[0-9a-f]{32}", rest)
            ):
                found.append(p)
        return found

    def write(self) -> None:
        """Record the names (atomically)."""
        text = json.dumps({"files": sorted(self.names)}, indent=1) + "\n"
        write_text_atomic(self.path, text)
