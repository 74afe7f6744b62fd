"""Image folders: the image files under a --data folder, searched recursively (each folder
entered once, hidden names and special files skipped), with ImageFolder labels where it holds
one subfolder per class. Torch-free."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fcmae.data.images import IMAGE_EXTENSIONS
from fcmae.errors import UserError

log = logging.getLogger("fcmae")


def find_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under root, searched recursively and sorted, with ImageFolder labels.

    Regular files only, each folder entered once (links followed, loops skipped), hidden
    names skipped; see _image_files. If root holds only subdirectories, each one is a class
    (label = its sorted index); otherwise the folder is flat and every label is -1. Returns
    (files, labels, classes).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"Data dir {root} does not exist; check the --data path.")
    if not root.is_dir():
        raise UserError(f"--data {root} is a file, not a folder; pass the folder of images.")
    if not any(root.iterdir()):
        raise UserError(f"Data dir {root} is empty; put images in it or pass another --data.")
    files = sorted(_image_files(root))
    if not files:
        raise UserError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; "
            f"pass a folder that contains some."
        )
    top = [f.relative_to(root).parts for f in files]
    if any(len(parts) == 1 for parts in top):
        return files, [-1] * len(files), []
    classes = sorted({parts[0] for parts in top})
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[parts[0]] for parts in top], classes


def _image_files(root: Path) -> list[Path]:
    """The regular files with an image extension under root. Links to folders are followed,
    but every folder is entered once, real folders before links: a link back up (a loop) or a
    second path to a folder is skipped, so no image is counted twice or labelled by the link's
    name. Hidden names (".*") and special files (a FIFO would block the reader) are skipped;
    what was skipped is logged with a count."""
    files: list[Path] = []
    skipped: dict[str, list[Path]] = {"hidden": [], "special": [], "again": []}
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders entered
    real, linked = [root], []  # folders to enter: links wait until every real one is entered
    while real or linked:
        folder = real.pop() if real else linked.pop(0)
        try:
            info = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("Skipping folder %s (%s).", folder, e.strerror or e)
            continue
        if (info.st_dev, info.st_ino) in seen:
            skipped["again"].append(folder)
            continue
        seen.add((info.st_dev, info.st_ino))
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped["hidden"].append(path)
            elif entry.is_dir():
                (linked if entry.is_symlink() else real).append(path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                (files if entry.is_file() else skipped["special"]).append(path)
    _log_skipped(root, skipped)
    return files


def _log_skipped(root: Path, skipped: dict[str, list[Path]]) -> None:
    what = {
        "hidden": "hidden entries (names starting with '.')",
        "special": "image names that are not regular files (FIFOs, devices, broken links)",
        "again": "links to folders already searched (a loop, or a second path to a folder)",
    }
    for kind, paths in skipped.items():
        if paths:
            log.warning("Skipped %d %s under %s, e.g. %s.", len(paths), what[kind], root, paths[0])


def class_folder(root: str | Path, flag: str) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder tree: (files, labels, sorted class names); flag names it in errors."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"{root} (from {flag}) is not a folder; pass a folder with one "
            f"subfolder of images per class."
        )
    files, labels, classes = find_images(root)
    if not classes:
        raise UserError(
            f"{root} (from {flag}) holds images directly; put them in one "
            f"subfolder per class ({root}/CLASS/IMAGE)."
        )
    # hidden folders and links (perhaps to a class folder: searched once) are no classes
    folders = {
        d.name for d in root.iterdir() if d.is_dir() and not (d.is_symlink() or d.name[0] == ".")
    }
    empty = sorted(folders - set(classes))
    if empty:
        raise UserError(
            f"Class folder {root / empty[0]} has no images; add images to it or remove it."
        )
    return files, labels, classes
