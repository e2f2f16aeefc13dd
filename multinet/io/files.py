"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Output paths are checked before any work (:func:`check_output_path`), so a typo in ``--save``
fails in a second instead of after the calibration it would have thrown away.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MultinetError


class OutputPathError(MultinetError):
    """An output path that cannot be written: a directory, an unwritable place, an unknown suffix."""


def _umask() -> int:
    """This process's umask, read without changing it where /proc allows (os.umask sets as it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask (mkstemp's 0600 is for secrets)."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that infer the format from it work),
    renamed onto ``path`` when the block finishes and removed if it fails (or is interrupted).
    The file ends with the permissions a plain ``open()`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)


def check_output_path(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output path that cannot be written; create nothing.

    ``what`` names the option in the message (e.g. ``--save``); ``suffixes``, when given, are the
    only endings accepted. A missing parent is fine when the nearest existing ancestor is a
    writable directory (it is created when the file is written)."""
    text = os.fspath(path)
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a directory; give a file path inside it")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise OutputPathError(f"{what} {str(path)!r} names a directory; give a file path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{what} {str(path)!r}: unknown file type {path.suffix or '(none)'!r}; "
                              f"use one of {', '.join(suffixes)}")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"{what} {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(path)!r}: cannot write in {str(ancestor)!r} (permission denied)")
    return path


def _nearest_existing(directory: Path) -> Path:
    """``directory`` or its closest ancestor that exists (as a file or directory)."""
    current = directory.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current
