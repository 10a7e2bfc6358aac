"""lordba_lab.cached: cache entries built under names of their own and published whole."""

import pytest

from lordba.errors import LoRDBAError
from lordba.format.atomic import TMP_MARK
from lordba_lab.cached import cached_file, cached_folder, move_into_place

DEAD_PID = 2**22 + 1  # above Linux's pid_max (4194304): no live process has it


def test_a_file_is_built_once_and_then_taken(tmp_path):
    builds = []

    def build(tmp):
        builds.append(tmp)
        tmp.write_bytes(b"entry")

    out = tmp_path / "entry.gguf"
    assert cached_file(out, build) == out == cached_file(out, build)
    assert len(builds) == 1 and builds[0] != out and builds[0].name.endswith(".gguf")
    assert out.read_bytes() == b"entry" and not builds[0].exists()


def test_a_build_that_writes_nothing_caches_nothing(tmp_path):
    with pytest.raises(LoRDBAError, match=r"entry\.gguf: its build wrote nothing"):
        cached_file(tmp_path / "entry.gguf", lambda tmp: None)
    assert [p.name for p in tmp_path.iterdir()] == [".entry.gguf.lock"]


def test_a_killed_builds_temporaries_are_removed_by_the_next_build(tmp_path):
    left = [tmp_path / f".entry.gguf{TMP_MARK}{DEAD_PID}.0a0b0c0d.gguf", tmp_path / f".dir{TMP_MARK}{DEAD_PID}.0a0b"]
    left[0].write_bytes(b"half")
    left[1].mkdir()
    cached_file(tmp_path / "entry.gguf", lambda tmp: tmp.write_bytes(b"whole"))
    cached_folder(tmp_path / "dir", lambda work: (work / "done").write_text("x"), done="done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dir.lock", ".entry.gguf.lock", "dir", "entry.gguf"]


def test_a_folder_without_its_done_file_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(LoRDBAError, match="dir: its build did not write done"):
        cached_folder(tmp_path / "dir", lambda work: (work / "half").write_text("x"), done="done")
    assert [p.name for p in tmp_path.iterdir()] == [".dir.lock"]


def test_a_finished_folder_another_build_published_is_kept_and_remains_are_replaced(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "done").write_text("other")
    work.mkdir()
    (work / "done").write_text("mine")
    move_into_place(work, out, "done")
    assert (out / "done").read_text() == "other"
    (out / "done").unlink()  # remains without their done file
    (out / "half").write_text("x")
    move_into_place(work, out, "done")
    assert sorted(p.name for p in out.iterdir()) == ["done"] and (out / "done").read_text() == "mine"
