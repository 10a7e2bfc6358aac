import os
import warnings
from pathlib import Path

import pytest
import torch

from lordba import LoRDBAConfig, LoRDBAError, LoRDBAModel, get_lordba_model
from lordba.format.adapter import read_adapter
from lordba.format.atomic import atomic_directory, atomic_write_bytes, atomic_write_path

from conftest import tiny_llama


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "x.json", b"1")
    atomic_write_bytes(tmp_path / "x.json", b"2")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"] and (tmp_path / "x.json").read_bytes() == b"2"


def test_save_leaves_only_the_two_files(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    for _ in range(2):
        lm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "lordba_model.safetensors",
    ]


def test_interrupted_save_between_renames_keeps_the_old_adapter(tmp_path, input_ids):
    """Simulate a save killed after the weights were replaced but before the config was: the
    loader reads the intact previous pair from the backups, and the next save cleans up."""
    base = tiny_llama(0)
    torch.manual_seed(1)
    old = get_lordba_model(base, LoRDBAConfig(r=2, init="random"))
    old.save_pretrained(tmp_path)
    with torch.no_grad():
        want = old(input_ids=input_ids).logits
    base = tiny_llama(0)
    torch.manual_seed(2)
    new = get_lordba_model(base, LoRDBAConfig(r=2, init="random"))
    new.save_pretrained(tmp_path / "n")
    os.link(tmp_path / "lordba_model.safetensors", tmp_path / ".lordba_model.safetensors.lordba-prev")
    os.link(tmp_path / "adapter_config.json", tmp_path / ".adapter_config.json.lordba-prev")
    os.replace(tmp_path / "n" / "lordba_model.safetensors", tmp_path / "lordba_model.safetensors")
    with pytest.warns(UserWarning, match="interrupted save"):
        adapter = read_adapter(tmp_path)
    assert adapter.recovered
    with pytest.warns(UserWarning):
        loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, want)
    new.save_pretrained(tmp_path)  # recovers, then commits the new adapter
    assert not list(tmp_path.glob(".*lordba-prev"))
    assert not read_adapter(tmp_path).recovered


def test_atomic_directory_cleans_up_on_error_and_refuses_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("x")
    with pytest.raises(LoRDBAError, match="already exists"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("y")
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_path_that_is_a_file_gives_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    with pytest.raises(LoRDBAError, match="file"):
        lm.save_pretrained(tmp_path / "file")
    with pytest.raises(LoRDBAError, match="not a directory"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "x"


def _state(seed):
    torch.manual_seed(seed)
    return get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"])).adapter_state(
        "default"
    )


def test_a_full_disk_is_a_lordba_error_and_the_old_adapter_stays(tmp_path, monkeypatch):
    import errno

    from lordba.format import commit

    _state(1).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commit, "_write_temp", full)
    with pytest.raises(LoRDBAError, match="No space left on device"):
        _state(2).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    read_adapter(tmp_path)


def test_a_nul_character_in_the_directory_is_a_lordba_error(tmp_path):
    with pytest.raises(LoRDBAError, match="not a usable path"):
        _state(1).save_pretrained(tmp_path / "a\x00b")
    with pytest.raises(LoRDBAError, match="not a usable path"):
        with atomic_directory(tmp_path / "a\x00b"):
            pass


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_and_dotdot_outputs_are_refused_cleanly(tmp_path, monkeypatch, name):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(LoRDBAError, match="already exists"):
        with atomic_directory(name):
            pass
    with pytest.raises(LoRDBAError, match="would delete the current directory"):
        with atomic_directory(name, overwrite=True):
            pass
    assert (tmp_path / "work").is_dir()


def test_overwrite_refuses_an_output_that_is_an_input_or_its_parent(tmp_path):
    source = tmp_path / "in" / "adapter"
    source.mkdir(parents=True)
    for out in (source, source.parent, tmp_path):
        with pytest.raises(LoRDBAError, match="would delete"):
            with atomic_directory(out, overwrite=True, keep=(source,)):
                pass
    assert source.is_dir()


def test_a_symlinked_output_is_replaced_without_leaving_temporary_names(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_directory(link, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    assert not link.is_symlink() and [p.name for p in link.iterdir()] == ["new"]
    assert (target / "old").read_text() == "kept"  # the link was replaced, not what it pointed to


@pytest.mark.parametrize("failing", [1, 2])
def test_a_rename_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch, failing):
    """os.replace failing for the weights (1) or the config (2), e.g. EIO or a quota: the temporary file
    it was renaming (the whole new weights file) stayed in the adapter directory until the next save;
    the previous adapter stays readable either way."""
    import dataclasses
    import errno

    from lordba.format import atomic
    from lordba.format.adapter import AdapterState

    old = _state(1)
    new = AdapterState(dataclasses.replace(old.config, alpha=7.0), old.modules)
    old.save_pretrained(tmp_path)
    before = read_adapter(tmp_path).sha256
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(LoRDBAError, match="Input/output error"):
        new.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.lordba-tmp.*"))
    monkeypatch.setattr(atomic.os, "replace", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config's rename failed: read from the backups
        assert read_adapter(tmp_path).sha256 == before
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "lordba_model.safetensors"]
    assert read_adapter(tmp_path).config.alpha == 7.0


def test_atomic_write_path_streams_a_whole_file_into_place_or_leaves_the_old_one(tmp_path):
    """The streaming variant (a writer that takes a file name, e.g. safetensors' save_file): the block writes the
    temporary path; a failure mid-write leaves the old file as it was and no temporary file, a success replaces it."""
    target = tmp_path / "entry.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_write_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.is_file() and tmp != target
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.safetensors"]
    with atomic_write_path(target, suffix=".pt2") as tmp:
        assert tmp.name.endswith(".pt2")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.safetensors"]
    with atomic_write_path(tmp_path / "sub" / "fresh.bin") as tmp:  # the directory is made
        tmp.write_bytes(b"x")
    assert (tmp_path / "sub" / "fresh.bin").read_bytes() == b"x"


def test_a_saved_file_keeps_the_permissions_of_the_one_it_replaces_and_new_ones_follow_the_umask(tmp_path):
    """A resave keeps a private (0600) adapter private (it was made world-readable 0644); a new file gets what an
    ordinary open gives under the umask (0664 under umask 002, in a group's shared directory: it was always 0644)."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    old_umask = os.umask(0o002)
    try:
        lm.save_pretrained(tmp_path / "new")
        atomic_write_bytes(tmp_path / "x.json", b"1")
        with atomic_write_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(old_umask)
    files = [*(tmp_path / "new").iterdir(), tmp_path / "x.json", tmp_path / "y.bin"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o664" for f in files}
    for f in files:
        f.chmod(0o600)
    lm.save_pretrained(tmp_path / "new")
    atomic_write_bytes(tmp_path / "x.json", b"2")
    with atomic_write_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"2")
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
    assert (tmp_path / "x.json").read_bytes() == b"2" and read_adapter(tmp_path / "new").modules


def test_saves_and_their_recovery_work_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """FAT/exFAT, SMB and some FUSE mounts (a notebook's cloud drive) refuse hard links: every save over an
    existing adapter failed ("cannot save (Operation not permitted)"); the backups are copies there."""
    import errno
    import shutil

    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    def state(seed):
        model = tiny_llama(0)
        torch.manual_seed(seed)  # after tiny_llama, which seeds with its own
        return get_lordba_model(model, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"])).adapter_state(
            "default"
        )

    monkeypatch.setattr(os, "link", no_link)
    weights, config = tmp_path / "lordba_model.safetensors", tmp_path / "adapter_config.json"
    state(1).save_pretrained(tmp_path)
    state(2).save_pretrained(tmp_path)
    state(2).save_pretrained(tmp_path / "n2")
    assert weights.read_bytes() == (tmp_path / "n2" / weights.name).read_bytes()
    for path in (weights, config):  # a save of state 3 killed between its two renames
        shutil.copy2(path, tmp_path / f".{path.name}.lordba-prev")
    state(3).save_pretrained(tmp_path / "n3")
    os.replace(tmp_path / "n3" / weights.name, weights)
    with pytest.warns(UserWarning, match="interrupted save"):
        assert read_adapter(tmp_path).recovered
    state(3).save_pretrained(tmp_path)  # restores the backups (by copying), then commits
    assert not read_adapter(tmp_path).recovered and not list(tmp_path.glob(".*"))
    assert config.read_bytes() == (tmp_path / "n3" / config.name).read_bytes()


def test_a_full_disk_in_a_single_file_or_directory_write_names_the_output_and_keeps_the_old_one(
    tmp_path, monkeypatch, capsys
):
    """A write that fails half-way (a full disk) raised a bare ``OSError(27, 'File too large')`` naming no file:
    a checkpoint, the training log or a result file lost to a full disk was `lordba train`'s internal error with a
    traceback. The error names the output (the CLI's exit 3); the previous output stays and no temporary is left."""
    import lordba.cli as cli
    from full_disk import disk_full_after

    (tmp_path / "x.json").write_bytes(b"old")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_bytes(b"old")
    (tmp_path / "s.bin").write_bytes(b"old")
    with disk_full_after(100), pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "x.json", b"x" * 1000)
    assert caught.value.filename == str(tmp_path / "x.json")
    with disk_full_after(100), pytest.raises(OSError) as caught:
        with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a").write_bytes(b"x" * 1000)
    assert caught.value.filename == str(tmp_path / "out")
    with disk_full_after(100), pytest.raises(OSError) as caught:
        with atomic_write_path(tmp_path / "s.bin") as tmp:
            tmp.write_bytes(b"x" * 1000)
    assert caught.value.filename == str(tmp_path / "s.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.bin", "x.json"]
    assert [p.read_bytes() for p in (tmp_path / "x.json", tmp_path / "out" / "a", tmp_path / "s.bin")] == [b"old"] * 3

    def command_writing_a_result(command, argv):
        with disk_full_after(100):
            atomic_write_bytes(tmp_path / "x.json", b"x" * 1000)

    monkeypatch.setattr(cli, "_run", command_writing_a_result)
    assert cli.main(["inspect", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"{tmp_path / 'x.json'}: File too large" in err and "internal error" not in err


def test_what_a_killed_run_left_is_removed_for_an_output_whose_name_holds_glob_characters(tmp_path):
    """An output named ``exp[lr=1e-3]`` (a sweep's): the next run's clean-up looked for the killed run's temporary
    directory with the name as a glob pattern (``[...]`` a character class), so it never found it and a whole
    copy of the output stayed beside it for good."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "exp[lr=1e-3]"
    stale = tmp_path / f".{out.name}.lordba-tmp.{gone.pid}.abcd1234"
    stale.mkdir()
    (stale / "weights").write_bytes(b"x" * 1000)
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp[lr=1e-3]"]


def test_a_full_disk_while_saving_several_adapters_leaves_every_one_as_it_was(tmp_path):
    """save_pretrained of ``default`` (r=2, 928 bytes of weights) and ``other`` (r=16, 5776 bytes) with room for
    3000 bytes a file: ``default`` was replaced by the new save, then ``other`` failed ("the previous files are
    intact"), leaving the folder with adapters of two different saves. Every file is now written before any
    replaces one: both adapters stay the previous save's."""
    from full_disk import disk_full_after

    def model(seed):
        base = tiny_llama(0)
        torch.manual_seed(seed)
        lm = get_lordba_model(base, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
        lm.add_adapter("other", LoRDBAConfig(r=16, init="random"))
        return lm

    model(1).save_pretrained(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert (tmp_path / "other" / "lordba_model.safetensors").stat().st_size > 3000
    assert (tmp_path / "lordba_model.safetensors").stat().st_size < 3000
    with disk_full_after(3000), pytest.raises(LoRDBAError, match=r"other: cannot save .*previous files are intact"):
        model(2).save_pretrained(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no temporary file either
    read_adapter(tmp_path), read_adapter(tmp_path / "other")
    model(2).save_pretrained(tmp_path)
    assert (tmp_path / "lordba_model.safetensors").read_bytes() != before[tmp_path / "lordba_model.safetensors"]


def test_a_save_into_two_names_of_one_directory_is_refused_not_a_hang(tmp_path):
    """Several adapter folders are committed together, each locked throughout: two names of one directory (a link,
    or Other and other on a case-insensitive file system) took its lock twice, the second waiting for ever."""
    import threading

    from lordba.format.commit import commit_file_sets

    (tmp_path / "a").mkdir()
    os.symlink("a", tmp_path / "b")
    raised = []

    def save():
        try:
            commit_file_sets([(tmp_path / "a", {"x": b"1"}), (tmp_path / "b", {"x": b"2"})], lambda found: True)
        except LoRDBAError as err:
            raised.append(str(err))

    worker = threading.Thread(target=save, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the save waited on its own lock"
    assert raised and "are one directory" in raised[0] and os.listdir(tmp_path / "a") == []


_LIVE_WRITER = """
import sys
from pathlib import Path
from lordba.format.atomic import atomic_directory, atomic_write_path
out = Path(sys.argv[1])
with atomic_directory(out / "result") as tmp, atomic_write_path(out / "step.pt2", suffix=".pt2") as tmp_file:
    tmp_file.write_bytes(b"half a package")
    print(tmp, tmp_file, flush=True)
    sys.stdin.read()  # at work until the test is done
"""


def test_a_live_writers_temporaries_in_another_pid_namespace_are_kept(tmp_path):
    """A folder shared by containers (separate pid namespaces) or machines (NFS): a live writer's temporary names a
    process id that is free here. Was: the clean-up of the next run (atomic_directory, a checkpoint save, a compile)
    judged by that id alone and deleted the live writer's temporary folder and package under it. The writer now
    holds a lock on its temporaries, which the clean-up asks; once the writer is gone (killed), they are removed."""
    import signal
    import subprocess
    import sys

    from lordba.format.atomic import TMP_MARK, remove_killed_temporaries

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its id is free here: what another namespace's writer id looks like
    writer = subprocess.Popen(
        [sys.executable, "-c", _LIVE_WRITER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        names = writer.stdout.readline().split()
        assert len(names) == 2, names
        moved = []
        for name in map(Path, names):  # the same folder and file (and lock), named by the other namespace's id
            head, _, tail = name.name.partition(TMP_MARK)
            moved.append(name.rename(name.with_name(f"{head}{TMP_MARK}{gone.pid}.{tail.split('.', 1)[1]}")))
        with atomic_directory(tmp_path / "result") as tmp:  # its clean-up, as the next run's
            (tmp / "a").write_text("1")
        remove_killed_temporaries(tmp_path, f".step.pt2{TMP_MARK}*")
        assert all(p.exists() for p in moved)
        assert moved[1].read_bytes() == b"half a package"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    with atomic_directory(tmp_path / "result", overwrite=True) as tmp:
        (tmp / "a").write_text("2")
    remove_killed_temporaries(tmp_path, f".step.pt2{TMP_MARK}*")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    assert (tmp_path / "result" / "a").read_text() == "2"


def test_a_temporary_whose_lock_cannot_be_asked_is_removed_only_once_a_day_old(tmp_path, monkeypatch):
    """Where no lock can be taken (a file system without them), a dead id alone no longer condemns a temporary: it
    is removed once untouched for a day."""
    import subprocess
    import sys

    from lordba.format import temp_owner
    from lordba.format.atomic import TMP_MARK, remove_killed_temporaries

    monkeypatch.setattr(temp_owner, "fcntl", None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    young, old = (tmp_path / f".step.pt2{TMP_MARK}{gone.pid}.{n}.pt2" for n in ("young", "old"))
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    day_ago = old.stat().st_mtime - temp_owner.UNLOCKED_STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    remove_killed_temporaries(tmp_path, f".step.pt2{TMP_MARK}*")
    assert sorted(tmp_path.iterdir()) == [young]


def test_on_windows_no_signal_is_sent_to_judge_a_temporary(tmp_path, monkeypatch):
    """``os.kill(pid, 0)`` is no probe on Windows: signal 0 is CTRL_C_EVENT, which it sends to the process group
    ``pid``, so the clean-up could Ctrl-C a live program whose id a temporary's name held. There the age rule alone
    decides (Windows has no fcntl locks either)."""
    from lordba.format import temp_owner
    from lordba.format.atomic import TMP_MARK, remove_killed_temporaries

    sent = []
    monkeypatch.setattr(temp_owner, "_WINDOWS", True)
    monkeypatch.setattr(temp_owner, "fcntl", None)
    monkeypatch.setattr(temp_owner.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    young, old = (tmp_path / f".step.pt2{TMP_MARK}{os.getpid()}.{n}.pt2" for n in ("young", "old"))
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    day_ago = old.stat().st_mtime - temp_owner.UNLOCKED_STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    remove_killed_temporaries(tmp_path, f".step.pt2{TMP_MARK}*")
    assert sent == [] and sorted(tmp_path.iterdir()) == [young]


def test_a_save_into_ones_own_temporary_folder_does_not_wait_for_itself(tmp_path):
    """The writer's lock on a temporary folder (kept for other pid namespaces' clean-up) made every lock the same
    process then asked on that folder wait for itself: ``lordba convert``'s save into its temporary output folder
    (``commit_files`` takes the folder's lock) hung for good. Run in a thread, so that a hang fails the test."""
    import threading

    from lordba._util import locks
    from lordba.format.atomic import atomic_directory

    done = []

    def save():
        with atomic_directory(tmp_path / "out") as tmp:
            with locks.locked(tmp):
                (tmp / "f").write_text("x")
            done.append(locks.wait_for_writer(tmp))

    worker = threading.Thread(target=save, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done == [False] and (tmp_path / "out" / "f").read_text() == "x"
    assert locks._PRIVATE == set()
