"""The one crash-safe write: all or nothing, the umask's mode, nothing left behind."""

import os
import stat

import pytest

from noblankslate.files import atomic_write, write_text_atomic


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_finished_write_replaces_the_file_with_the_plain_mode(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second", durable=True)
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "second" and _mode(target) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "wb") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_two_writers_use_different_temporaries(tmp_path):
    target = tmp_path / "x.txt"
    with atomic_write(target) as a, atomic_write(target) as b:
        hidden = sorted(p.name for p in tmp_path.iterdir())
        assert len(hidden) == 2 and all(n.startswith(".x.txt.") and n.endswith(".tmp") for n in hidden)
        a.write("a")
        b.write("b")
    assert target.read_text() == "a"  # the outer block finished last: its file is the one in place


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_write("x", "a"):
            pass
