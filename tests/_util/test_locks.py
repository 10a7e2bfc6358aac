"""``lordba._util.locks.locked``: while one holder has a directory's lock, another process's ``flock``
(another open file) is refused; the lock is released when the block ends, even by an error."""

import fcntl
import os

import pytest

from lordba._util.locks import locked


def _free(directory) -> bool:
    fd = os.open(directory, os.O_RDONLY)  # another open file: flock treats it as another holder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_is_held_in_the_block_and_released_after_it(tmp_path):
    folder = tmp_path / "new" / "folder"
    with locked(folder):
        assert folder.is_dir() and not _free(folder)
    assert _free(folder) and list(folder.iterdir()) == []  # no lock file left
    with pytest.raises(KeyError), locked(folder):
        raise KeyError("boom")
    assert _free(folder)
