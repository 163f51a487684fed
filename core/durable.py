"""Files that survive a crash or a power loss whole: written under a temporary name, flushed to
disk, renamed into place, the folder flushed too. A reader sees the old file or the new one,
never half of one, and a rename acknowledged before a power loss is still there after it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flushes `path` (a file, or a folder's entries) to disk; raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Writes `path` through `write(temporary path)`, then flushes and renames it into place (its
    folder created, and flushed, if missing). The temporary name is per process: two processes
    writing the same file each rename their own, and the last one wins. Raises OSError."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_path(folder.parent)  # the new folder's entry
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(temp)
    fsync_path(temp)  # the data, before the name points at it
    temp.replace(path)
    fsync_path(folder)  # the rename
