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


def test_wait_for_writer_says_whether_a_writer_held_the_lock_and_waits_for_it(tmp_path):
    import threading
    import time

    from lordba._util.locks import wait_for_writer

    assert wait_for_writer(tmp_path) is False  # no writer
    answers = []
    with locked(tmp_path):
        reader = threading.Thread(target=lambda: answers.append(wait_for_writer(tmp_path)))
        reader.start()
        time.sleep(0.3)
        assert not answers  # waiting
    reader.join(10)
    assert answers == [True] and wait_for_writer(tmp_path / "missing") is False
