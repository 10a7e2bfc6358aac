"""The fuzzing worker's saved failures (``lordba_lab.fuzz.worker.save_failure``)."""

import io

import pytest

from lordba_lab.fuzz.corpus import decode_case, encode_case, seed_cases
from lordba_lab.fuzz.worker import save_failure


class _HalfWriter:
    """A file opened for writing whose write of ``data`` writes half of it, then is interrupted (a Ctrl-C)."""

    def __init__(self, file, data: bytes) -> None:
        self._file, self._data = file, data

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, chunk) -> int:
        if bytes(chunk) == self._data:
            self._file.write(self._data[: len(self._data) // 2])
            self._file.flush()
            raise KeyboardInterrupt
        return self._file.write(chunk)


def test_a_save_interrupted_midway_leaves_no_truncated_case(tmp_path, monkeypatch):
    """A worker interrupted while it writes a failing case leaves no part of it that a later ``--replay`` would decode
    as another, shorter case (and report clean); the next save of the finding writes it whole."""
    case = seed_cases(count=1)[0]
    data = encode_case(case)
    real_open = io.open

    def half_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return _HalfWriter(opened, data) if "w" in mode else opened

    monkeypatch.setattr(io, "open", half_open)
    with pytest.raises(KeyboardInterrupt):
        save_failure(tmp_path, data, "crash", "the loader crashed")
    monkeypatch.setattr(io, "open", real_open)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [name for name in left if name.endswith(".case")], left
    assert all(name.endswith(".txt") for name in left), left  # (no temporary left either)

    saved = save_failure(tmp_path, data, "crash", "the loader crashed")
    assert saved.read_bytes() == data
    assert decode_case(saved.read_bytes()) == case
    assert saved.with_suffix(".txt").read_text() == "the loader crashed\n"
