"""``lordba._util.files``: which folders an untrusted directory's symbolic links may point into."""

import os

import pytest

from lordba._util.files import link_roots, open_untrusted, windows_name_problem
from lordba.errors import AdapterFormatError


def _linked(snapshot, blobs):
    """A file in ``blobs`` and a link to it in ``snapshot`` (as the hub lays them out)."""
    snapshot.mkdir(parents=True)
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / "abc").write_bytes(b"data")
    (snapshot / "adapter_config.json").symlink_to(os.path.relpath(blobs / "abc", snapshot))
    return snapshot / "adapter_config.json"


def test_a_hub_cache_snapshot_may_link_into_its_blobs_and_a_users_snapshots_folder_may_not(tmp_path):
    """Any folder under a parent named ``snapshots`` was taken for a hub snapshot: a user's ``~/snapshots/adapter``
    had its links followed into ``~/blobs``, outside the adapter's directory. Only the hub cache's layout
    (``models--ORG--NAME/snapshots/REV`` beside ``blobs``) gets the exemption."""
    repo = tmp_path / "hub" / "models--org--name"
    link = _linked(repo / "snapshots" / ("0" * 40), repo / "blobs")
    assert link_roots(link.parent) == (link.parent, repo / "blobs")
    assert link_roots(link.parent / "sub") == (link.parent / "sub", repo / "blobs")  # (a subfolder, resolved)
    with open_untrusted(link) as f:
        assert f.read() == b"data"
    user = tmp_path / "home"
    link = _linked(user / "snapshots" / "my-adapter", user / "blobs")
    assert link_roots(link.parent) == (link.parent,)
    with pytest.raises(AdapterFormatError, match="symbolic link to a file outside the adapter directory"):
        open_untrusted(link)
    bare = tmp_path / "models--org--bare"  # the hub's name, but no blobs folder beside the snapshots
    (bare / "snapshots" / "rev").mkdir(parents=True)
    assert link_roots(bare / "snapshots" / "rev") == (bare / "snapshots" / "rev",)


@pytest.mark.parametrize(
    "name", ["CON", "con", "Aux", "aux.json", "NUL.tar.gz", "com0", "COM9", "lpt1", "LPT\u00b3", "nul .txt"]
)
def test_windows_device_names_are_named_as_such(name):
    assert "device name" in windows_name_problem(name)


@pytest.mark.parametrize(("name", "char"), [("a:b", ":"), ("a<b", "<"), ('a"b', '"'), ("a*", "*"), ("a\x1fb", "\x1f")])
def test_characters_windows_refuses_are_named(name, char):
    assert repr(char) in windows_name_problem(name)


@pytest.mark.parametrize("name", ["end.", "end ", "CON."])
def test_a_trailing_dot_or_space_is_refused(name):
    assert "ends in a dot or a space" in windows_name_problem(name)


@pytest.mark.parametrize(
    "name", ["default", "com10", "console", "lpt", "my_adapter", "aux-2", "con_fig", "é", "my adapter", "v1.2"]
)
def test_ordinary_names_pass(name):
    assert windows_name_problem(name) is None


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path, monkeypatch):
    """The file is opened without following a link in its last component: a name that became a link to a file
    outside the directory between the check and the open (as if the check had found a regular file) is refused."""
    from lordba._util import files

    (tmp_path / "secret").write_bytes(b"private")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "config.json").symlink_to(tmp_path / "secret")
    monkeypatch.setattr(files, "_resolve_link", lambda path: path)  # the race: the check saw no link
    with pytest.raises(AdapterFormatError, match=r"config\.json: cannot open"):
        open_untrusted(tmp_path / "adapter" / "config.json")


def test_a_refused_file_leaves_no_descriptor_open(tmp_path, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *args: opened.append(real_open(*args)) or opened[-1])
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("folder", "fifo"):
        with pytest.raises(AdapterFormatError, match=f"{name}: not a regular file"):
            open_untrusted(tmp_path / name)
    assert len(opened) == 2
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


def test_a_missing_file_is_named_with_the_callers_words(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"config\.json: missing \(not an adapter directory\)"):
        open_untrusted(tmp_path / "config.json", "missing (not an adapter directory)")
    with open_untrusted(_linked(tmp_path / "a", tmp_path / "a" / "blobs")) as f:  # a link inside the directory
        assert f.read() == b"data"


def test_a_link_inside_a_directory_reached_through_a_link_is_followed(tmp_path):
    """The directory's own path may pass through a link (``~/adapters`` -> ``/data/adapters``): a link inside it to a
    file beside it stays inside it once both are resolved."""
    (tmp_path / "data" / "adapter").mkdir(parents=True)
    (tmp_path / "data" / "adapter" / "weights.bin").write_bytes(b"weights")
    (tmp_path / "data" / "adapter" / "link.bin").symlink_to("weights.bin")
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    with open_untrusted(tmp_path / "alias" / "adapter" / "link.bin") as f:
        assert f.read() == b"weights"


def test_a_directory_argument_that_is_none_says_what_is_there_instead(tmp_path):
    """``lordba inspect /nope`` said "/nope: not a directory", the same as for a file: a typo read like a wrong kind of
    path. The message says what is there: nothing, or a file (reading an adapter, a PEFT LoRA, a served folder)."""
    from lordba.config import read_config_json
    from lordba.convert.peft_files import _resolve_dir
    from lordba.format.adapter import read_adapter

    (tmp_path / "file").write_text("x")
    for path, there in ((tmp_path / "typo", "nothing is there"), (tmp_path / "file", "a file")):
        for read in (read_adapter, read_config_json, lambda p: _resolve_dir(p, "default")):
            with pytest.raises(AdapterFormatError, match=f"{path}: not a directory \\({there}\\)"):
                read(path)
