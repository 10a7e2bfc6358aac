"""``lordba._util.locks.locked``: while one holder has a directory's lock, another process's ``flock``
(another open file) is refused; the lock is released when the block ends, even by an error."""

import errno
import fcntl
import os

import pytest

from lordba._util.locks import locked

from conftest import locked_elsewhere


def _free(directory) -> bool:
    return not locked_elsewhere(directory)  # (another open file: flock treats it as another holder)


def test_the_lock_is_held_in_the_block_and_released_after_it(tmp_path):
    folder = tmp_path / "new" / "folder"
    with locked(folder):
        assert folder.is_dir() and not _free(folder)
    assert _free(folder) and list(folder.iterdir()) == []  # no lock file left
    with pytest.raises(KeyError), locked(folder):
        raise KeyError("boom")
    assert _free(folder)


def test_wait_for_writer_says_whether_a_writer_held_the_lock_and_waits_for_it(tmp_path, monkeypatch):
    """The writer lets go only once the reader has found it there (its try without waiting refused): a reader thread
    that a loaded machine started late found no writer at all (a fixed 0.3 s sleep: ``[False]``)."""
    import threading

    from lordba._util.locks import wait_for_writer

    assert wait_for_writer(tmp_path) is False  # no writer
    answers, refused, real_flock = [], threading.Event(), fcntl.flock

    def flock(fd: int, op: int) -> None:
        try:
            real_flock(fd, op)
        except BlockingIOError:
            refused.set()
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    with locked(tmp_path):
        reader = threading.Thread(target=lambda: answers.append(wait_for_writer(tmp_path)))
        reader.start()
        assert refused.wait(60), "the reader never tried the lock"
        reader.join(0.3)
        assert not answers  # waiting
    reader.join(60)
    assert answers == [True] and wait_for_writer(tmp_path / "missing") is False


def test_a_reader_whose_wait_for_a_running_save_fails_gets_a_format_error_not_an_oserror(tmp_path, monkeypatch):
    """A reader that found a half-replaced adapter while a save held the folder's lock waits for it; a wait the kernel
    refused (ENOLCK: no lock record left) escaped read_adapter as a bare OSError. The reader reads again, and a pair
    still inconsistent is an AdapterFormatError, as where no save is running."""
    from lordba import LoRDBAConfig, get_lordba_model
    from lordba.errors import AdapterFormatError
    from lordba.format.adapter import read_adapter

    from conftest import tiny_llama

    config = LoRDBAConfig(r=2, init="random", target_modules=["q_proj"])
    get_lordba_model(tiny_llama(0), config).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "lordba_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the weights renamed in, the config not yet: the config's checksum does not match them
    weights.write_bytes(bytes(data))
    real, waits = fcntl.flock, []

    def flock(fd, op):
        if op == fcntl.LOCK_SH:  # the reader's wait for the writer
            waits.append(op)
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, op)

    with locked(tmp_path / "a"):  # a save running (another open file: flock treats it as another process)
        monkeypatch.setattr(fcntl, "flock", flock)
        with pytest.raises(AdapterFormatError, match=r"lordba_model\.safetensors"):
            read_adapter(tmp_path / "a")
        monkeypatch.setattr(fcntl, "flock", real)
    assert waits  # it did find the writer and try to wait


def _forked_sleeper():
    """Fork a child that waits until told to exit (a DataLoader worker started meanwhile); returns (pid, release)."""
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child runs nothing of pytest's)
        os.write(ready[1], b"1")  # after the fork's handlers ran
        os.read(go[0], 1)
        os._exit(0)
    os.read(ready[0], 1)
    for fd in (ready[0], ready[1], go[0]):
        os.close(fd)

    def release():
        os.write(go[1], b"1")
        os.close(go[1])
        os.waitpid(pid, 0)

    return pid, release


def test_a_process_forked_while_a_lock_is_held_does_not_keep_it(tmp_path):
    """A process forked while a directory's lock was held (a DataLoader worker started while another thread saved)
    inherited the descriptor, and flock's lock is the open file's: the lock outlived the block until the child exited,
    and every later save into that directory waited for it. The child now closes its copies at the fork, which leaves
    the parent's lock held."""
    with locked(tmp_path):
        _, release = _forked_sleeper()
        try:
            assert not _free(tmp_path)  # the child closing its copy did not release the parent's lock
        except BaseException:
            release()
            raise
    try:
        assert _free(tmp_path)  # released by the parent, the child still running
    finally:
        release()


def test_a_process_forked_while_a_temporary_folder_is_written_does_not_lock_the_output(tmp_path):
    """The writer's lock on atomic_directory's temporary folder stays on the folder once renamed into place: a child
    forked during the write kept it, so a save into the finished output (its commit_files lock) waited for the child
    to exit."""
    from lordba._util import locks
    from lordba.format.atomic import atomic_directory

    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
        _, release = _forked_sleeper()
    try:
        assert _free(tmp_path / "out") and locks._HELD == set() and locks._PRIVATE == set()
    finally:
        release()
