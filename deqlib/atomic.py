"""Atomic file writes: a reader (or the next run after a kill) sees a file's old content or its
whole new content, never a part of it.

The new content goes to a temporary file in the same folder (so that the rename stays on one
file system), is flushed to disk, and is then renamed over the file with ``os.replace``. A write
that fails removes its temporary; one a killed process left is found with
:func:`leftover_temporaries`.

Downloads (:mod:`deqlib.data.download`) keep their own ``<dest>.partial-<pid>`` scheme: they
check a checksum before the rename and remove the partial files of processes that are gone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "leftover_temporaries"]

_MODES = ("w", "wb")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary beside ``path`` for writing (``mode`` ``"w"`` or ``"wb"``; ``kwargs`` as
    for :func:`open`, e.g. ``newline=""``); when the block ends without an error, fsync it and
    rename it onto ``path``. On an error (or an interrupt) the temporary is removed and ``path``
    keeps its old content.

    The temporary is created with the permissions a plain ``open`` would give (the umask's),
    not ``mkstemp``'s private 0600: the file it becomes is an ordinary output.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_open writes a whole file: mode must be one of {list(_MODES)}, got mode={mode!r}")
    path = Path(path)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            fh = os.fdopen(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporaries of :func:`atomic_open` for ``path`` still in its folder (what a killed
    writer left), sorted."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))
