import os
import warnings

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

    from lordba.format import atomic

    _state(1).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_temp", full)
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

    from lordba.format.atomic import commit_file_sets

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
