"""lordba_lab.cached: cache entries built under names of their own and published whole."""

import os
import time

import pytest

from lordba.errors import LoRDBAError
from lordba.format.atomic import TMP_MARK
from lordba_lab.cached import cached_file, cached_folder, move_into_place, remove_old_partials

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


def _age(path, days):
    """Set the modification time of ``path`` and everything in it ``days`` back."""
    then = time.time() - days * 24 * 3600
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_what_earlier_releases_builds_left_is_removed_once_no_build_can_be_writing_it(tmp_path):
    """The builds of earlier releases worked in one shared ``<entry>.partial`` name, and what an interrupted one left
    (a model's gigabyte, a Q4_0 GGUF) stayed for good. They held no lock a build can ask, so a build removes those
    untouched for a day; one touched since, even deep in a folder, may be another process's build at work."""
    old_file, old_folder = tmp_path / "SmolLM2-135M-Instruct.Q4_0.partial", tmp_path / "llama.cpp-0.3.36.partial"
    old_file.write_bytes(b"half")
    (old_folder / "gguf-py").mkdir(parents=True)
    (old_folder / "gguf-py" / "gguf.py").write_text("x")
    at_work = tmp_path / "lora-0123456789abcdef-f16.partial"
    at_work.write_bytes(b"being written")
    deep_at_work = tmp_path / "llama.cpp-0.3.35.partial"
    (deep_at_work / "gguf-py").mkdir(parents=True)
    (deep_at_work / "gguf-py" / "gguf.py").write_text("x")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"an entry")
    for path in (old_file, old_folder, deep_at_work, other):
        _age(path, 2)
    os.utime(deep_at_work / "gguf-py" / "gguf.py")  # written just now
    cached_file(tmp_path / "entry.gguf", lambda tmp: tmp.write_bytes(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".entry.gguf.lock", "entry.gguf", at_work.name, deep_at_work.name, other.name]
    )
    assert sorted(remove_old_partials(tmp_path, builders_locked_out=True)) == sorted([at_work, deep_at_work])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.gguf.lock", "entry.gguf", other.name]
