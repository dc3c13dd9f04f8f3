"""Atomic writes (deqlib.atomic): a file is either its old content or its whole new content,
never a part, and a failed write leaves no temporary behind."""

import os
import stat

import pytest

from deqlib.atomic import atomic_open, leftover_temporaries


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old\n")
    with atomic_open(path, "w") as fh:
        fh.write("new\n")
        assert path.read_text() == "old\n"  # nothing visible until the write is complete
    assert path.read_text() == "new\n"
    with atomic_open(path, "wb") as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "curves.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv"]


def test_the_file_gets_the_permissions_of_a_plain_open(tmp_path):
    """A temporary made by ``mkstemp`` is private (0600); the written file must be readable as
    one made by ``open`` is (what the umask allows)."""
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        with atomic_open(tmp_path / "atomic.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_a_killed_writer_s_temporary_is_found_beside_its_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "wb") as fh:
            fh.write(b"x")
            left = [p for p in tmp_path.iterdir() if p != path]
            assert leftover_temporaries(path) == left and len(left) == 1
            raise KeyboardInterrupt
    assert leftover_temporaries(path) == [] and not path.exists()
    (tmp_path / "checkpoint.pt.bak").write_text("mine")  # another file is not a temporary
    assert leftover_temporaries(path) == []


def test_a_bad_mode_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
