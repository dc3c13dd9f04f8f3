"""deqlib.data.download: atomic, checksummed, clear errors; tested on local files and a
server on this machine only."""

import hashlib
import io
import os
import re
import socket
import tarfile
import threading

import pytest

from deqlib.data.download import DATA_ENV, DEFAULT_DATA_DIR, DownloadError, data_root, download, extract


def _payload(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"deq" * 1000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_download_file_url_with_checksum(tmp_path):
    src, digest = _payload(tmp_path)
    dest = download(src.as_uri(), tmp_path / "out" / "data.bin", digest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["data.bin"]  # no partial file left
    assert download("file:///nonexistent", dest, digest) == dest  # present and valid: no fetch


def test_checksum_mismatch_leaves_nothing(tmp_path):
    src, _ = _payload(tmp_path)
    dest = tmp_path / "out" / "data.bin"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(src.as_uri(), dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_offline_error_names_url_and_destination(tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match=r"could not download file:///no/such/file.*place the file at"):
        download("file:///no/such/file", dest, "0" * 64)
    assert not dest.exists()


def test_existing_corrupt_file_is_reported(tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"corrupt")
    with pytest.raises(DownloadError, match="exists but its sha256"):
        download("file:///unused", dest, "0" * 64)


def test_extract_is_all_or_nothing(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"hello"
        info = tarfile.TarInfo("root/x.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    out = extract(archive, tmp_path / "data", "root")
    assert (out / "x.txt").read_bytes() == b"hello"
    with pytest.raises(Exception, match="holds no folder 'other'"):
        extract(archive, tmp_path / "data2", "other")
    assert not (tmp_path / "data2" / "other").exists()
    assert [p.name for p in (tmp_path / "data2").iterdir()] == []


def test_data_root_from_parameter_or_environment(monkeypatch, tmp_path):
    """data.root, else $DEQLIB_DATA, else data/ beside params.yaml (the folder ``base`` names)."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(ValueError, match=DATA_ENV):
        data_root(None)
    assert data_root("", base=tmp_path) == tmp_path / DEFAULT_DATA_DIR == tmp_path / "data"
    assert data_root(str(tmp_path)) == tmp_path
    assert data_root("../d", base=tmp_path) == tmp_path / "../d"
    assert data_root(str(tmp_path), base="/elsewhere") == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_root("") == tmp_path / "env"
    assert data_root("", base=tmp_path / "repo") == tmp_path / "env"
    assert data_root(str(tmp_path)) == tmp_path
    assert data_root("d", base=tmp_path / "repo") == tmp_path / "repo" / "d"


def test_a_connection_cut_mid_body_is_a_download_error_and_leaves_nothing(tmp_path):
    """http.client.IncompleteRead is neither URLError nor OSError: it escaped download(), so a
    caller never tried its next mirror, and the message named no URL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():  # a chunked reply that promises 256 bytes and sends 10
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 10)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/file.bin"
    dest = tmp_path / "file.bin"
    try:
        with pytest.raises(DownloadError, match=rf"could not download {re.escape(url)} .*IncompleteRead"):
            download(url, dest, "0" * 64)
    finally:
        srv.close()
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_download_left_is_removed_and_a_running_one_kept(tmp_path):
    """A kill skips the clean-up: its ``.partial-<pid>`` file stayed forever, one per kill."""
    import subprocess
    import sys

    src, digest = _payload(tmp_path)
    dest = tmp_path / "data" / "file.bin"
    dest.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    abandoned = dest.with_name(f"file.bin.partial-{int(dead.stdout)}")
    running = dest.with_name(f"file.bin.partial-{os.getppid()}")  # a live process: a concurrent download
    for part in (abandoned, running):
        part.write_bytes(b"half")
    assert download(src.as_uri(), dest, digest) == dest
    assert not abandoned.exists() and running.exists()
