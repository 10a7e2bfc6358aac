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


@pytest.mark.parametrize("name", ["default", "com10", "console", "lpt", "my_adapter", "aux-2", "con_fig", "é"])
def test_ordinary_names_pass(name):
    assert windows_name_problem(name) is None
