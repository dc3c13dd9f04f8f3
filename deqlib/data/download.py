"""Fetching data sets: canonical URLs, known checksums, atomic writes, clear errors.

A file is downloaded to ``<dest>.partial-<pid>``, its checksum checked, and only then renamed
onto ``dest``, so an interrupted or corrupt download never looks complete. Archives are
extracted into a temporary sibling folder that is renamed into place at the end.

Where data lives is configuration: :func:`data_root` reads an explicit parameter first, then the
``DEQLIB_DATA`` environment variable, then the ``data/`` folder beside ``params.yaml``
(:data:`DEFAULT_DATA_DIR`, git-ignored, where the pipeline's fetch stages put what they
download), and never guesses a path of this machine.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

__all__ = ["DATA_ENV", "DEFAULT_DATA_DIR", "data_root", "file_digest", "download", "extract", "DownloadError"]

DATA_ENV = "DEQLIB_DATA"
DEFAULT_DATA_DIR = "data"  # relative to the folder of params.yaml (the repository root)


class DownloadError(RuntimeError):
    """A file could not be fetched, or its checksum did not match. ``url`` and ``reason`` say
    which URL could not be reached and why (None for other failures), for a caller that
    reports several mirrors in one message."""

    def __init__(self, message: str, url: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.url, self.reason = url, reason


def data_root(configured: str | os.PathLike | None = None, base: str | os.PathLike | None = None) -> Path:
    """The data folder: ``configured`` if given (non-empty), else ``$DEQLIB_DATA`` if set, else
    ``base/data`` (:data:`DEFAULT_DATA_DIR`).

    A relative ``configured`` path is resolved against ``base`` when given: experiments pass
    the folder of ``params.yaml`` (the repository root), so ``../shared/data/...`` in
    ``params.yaml`` means the same from a notebook, a test or the DVC stage, and the default is
    the repository's ``data/``, the folder DVC's fetch stages fill. Raises ``ValueError`` when
    none of the three is given, naming the ways to set it.
    """
    if configured not in (None, ""):
        path = Path(configured).expanduser()
        return Path(base) / path if base is not None and not path.is_absolute() else path
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(env).expanduser()
    if base is not None:
        return Path(base) / DEFAULT_DATA_DIR
    raise ValueError(f"no data root: set the experiment's data.root parameter or the {DATA_ENV} "
                     "environment variable")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_abandoned_partials(dest: Path) -> None:
    """Delete ``dest.partial-<pid>`` files whose process is gone: what a killed download left
    (a data set's worth each). One of a live process (a download running beside this one) is
    kept."""
    for part in dest.parent.glob(f"{dest.name}.partial-*"):
        pid = part.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass  # alive under another user, or not a pid: leave it


def download(url: str, dest: str | os.PathLike, checksum: str, algorithm: str = "sha256",
             timeout: float = 60.0, headers: dict[str, str] | None = None) -> Path:
    """Download ``url`` to ``dest`` unless a file with the right checksum is already there.

    Args:
        checksum: expected hex digest of the file (``algorithm``: ``"sha256"`` or ``"md5"``).
        headers: extra HTTP request headers (e.g. a User-Agent some hosts require).
    Raises:
        DownloadError: offline / HTTP failure (naming the URL and where to put the file by
            hand) or a checksum mismatch (the bad file is removed, never left at ``dest``).
    """
    dest = Path(dest)
    if dest.exists():
        got = file_digest(dest, algorithm)
        if got == checksum:
            return dest
        raise DownloadError(f"{dest} exists but its {algorithm} is {got}, expected {checksum}; "
                            "delete it to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(dest)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    try:
        try:
            request = urllib.request.Request(url, headers=dict(headers or {}))
            with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            # HTTPException: a connection cut mid-body (IncompleteRead) must fail over to the
            # next mirror like any other network error.
            raise DownloadError(f"could not download {url} ({err}); with no network, place the "
                                f"file at {dest} by hand", url=url, reason=str(err)) from err
        got = file_digest(tmp, algorithm)
        if got != checksum:
            raise DownloadError(f"checksum mismatch for {url}: {algorithm} {got}, expected {checksum}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def extract(archive: str | os.PathLike, into: str | os.PathLike, member_root: str) -> Path:
    """Extract ``archive`` (tar or zip) so that ``into/member_root`` appears complete or not at all.

    ``member_root`` is the top-level folder the archive holds (e.g. ``cifar-10-batches-py``).
    Returns ``into/member_root``.
    """
    into = Path(into)
    final = into / member_root
    if final.exists():
        return final
    tmp = into / f".extract-{member_root}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        archive = Path(archive)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        if not (tmp / member_root).is_dir():
            raise DownloadError(f"{archive} holds no folder {member_root!r}")
        os.replace(tmp / member_root, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
