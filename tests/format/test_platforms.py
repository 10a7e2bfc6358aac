"""Saving and loading where the POSIX calls the crash-safe writes use are missing (Windows: no ``fcntl``, no
``os.fchmod`` before Python 3.13, no ``os.fork`` or ``os.register_at_fork``) or refused (NFS: ``flock`` on a
directory opened read-only)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lordba.format.adapter import read_adapter

from conftest import refuse_directory_locks

TESTS = Path(__file__).resolve().parents[1]

# torch's and transformers' Linux builds import fcntl themselves: they are loaded before it is hidden from lordba
_WINDOWS_LIKE = """
import os, signal, sys, warnings
import torch, torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM
sys.modules["fcntl"] = None
for name in ("fchmod", "fork", "register_at_fork", "getuid", "geteuid", "getgid"):
    if hasattr(os, name):
        delattr(os, name)
delattr(signal, "SIGKILL")
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
from conftest import tiny_llama
from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.format.adapter import read_adapter

out = sys.argv[1]
lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
lm.save_pretrained(out)
os.chmod(os.path.join(out, "adapter_config.json"), 0o600)
lm.save_pretrained(out)  # over the first: the replacement keeps the file's permissions
loaded = LoRDBAModel.from_pretrained(tiny_llama(0), out)
print(oct(os.stat(os.path.join(out, "adapter_config.json")).st_mode & 0o777), sorted(read_adapter(out).modules)[0])
"""


def test_save_over_an_adapter_and_load_it_without_fcntl_or_fchmod(tmp_path):
    """Windows (Python 3.10 to 3.12 have no ``os.fchmod``): the second save_pretrained into a folder, which keeps the
    replaced file's permissions, failed with ``AttributeError: module 'os' has no attribute 'fchmod'``; it sets them by
    name there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LORDBA_KERNEL": "torch"}  # no compile
    run = subprocess.run(
        [sys.executable, "-c", _WINDOWS_LIKE, str(tmp_path / "a"), str(TESTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "0o600" and "layers" in run.stdout
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "lordba_model.safetensors",
    ]


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK])
def test_saves_on_nfs_succeed_and_keep_a_live_writers_temporaries(tmp_path, monkeypatch, code):
    """On NFS every save_pretrained failed ("cannot save (Bad file descriptor)"), and a reader that found an
    interrupted save raised a bare OSError: flock on the adapter directory is refused there. The save now runs without
    the directory's lock and its clean-up removes only temporaries whose writer is gone (another machine's running
    save holds its temporary's lock, which NFS keeps); the reader reads the intact previous adapter."""
    import fcntl
    import subprocess
    import warnings

    from test_file_concurrency import state

    from lordba.format import atomic, temp_owner
    from lordba.format.atomic import TMP_MARK

    refuse_directory_locks(monkeypatch, code)
    out = tmp_path / "a"
    state(1.0, 0).save_pretrained(out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # an id free here: another machine's writer, or a killed one
    live, dead = (out / f".adapter_config.json{TMP_MARK}{gone.pid}.{n}" for n in ("live", "dead"))
    live.write_bytes(b"{half")
    dead.write_bytes(b"{half")
    other = os.open(live, os.O_RDWR)  # the other machine's writer holds its lock
    seen = []
    real_replace = atomic.os.replace

    def replace(src, dst):  # this save's own temporaries are held the same way while it runs
        seen.append(temp_owner._locked_by_writer(Path(src)))
        real_replace(src, dst)

    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(atomic.os, "replace", replace)
        state(2.0, 1).save_pretrained(out)
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        assert live.read_bytes() == b"{half" and not dead.exists() and seen == [True, True]
    finally:
        os.close(other)
    assert read_adapter(out).config.alpha == 2.0
    os.link(out / "lordba_model.safetensors", out / ".lordba_model.safetensors.lordba-prev")  # killed between renames
    os.link(out / "adapter_config.json", out / ".adapter_config.json.lordba-prev")
    state(3.0, 2).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "lordba_model.safetensors", out / "lordba_model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_adapter(out).config.alpha == 2.0
    assert any("interrupted save" in str(w.message) for w in caught)


def test_a_file_that_cannot_be_replaced_is_named_and_the_adapter_kept(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (a safetensors ``safe_open`` mapping in a
    notebook, an indexer): the save said only '<folder>: cannot save (Access is denied)'. It names the file and the
    likely reason; the previous adapter stays readable."""
    from test_file_concurrency import state

    from lordba import LoRDBAError
    from lordba.format import atomic

    state(1.0, 0).save_pretrained(tmp_path)
    real_replace = atomic.os.replace

    def replace(src, dst):
        if Path(dst).name == "lordba_model.safetensors":
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(LoRDBAError, match=r"lordba_model\.safetensors: cannot replace it.*another program.*intact"):
        state(2.0, 1).save_pretrained(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert read_adapter(tmp_path).config.alpha == 1.0
    assert sorted(p.name for p in tmp_path.iterdir() if "lordba-tmp" in p.name) == []


def _link_refused(code: int, winerror: int | None) -> OSError:
    err = OSError(code, os.strerror(code))
    if winerror is not None:
        err.winerror = winerror  # what Python sets on Windows (the 4th argument is ignored elsewhere)
    return err


@pytest.mark.parametrize(
    ("code", "winerror"),
    [(errno.EPERM, None), (errno.ENOTSUP, None), (errno.EOPNOTSUPP, None), (errno.EINVAL, 1)],
    ids=["linux-vfat-exfat", "enotsup", "eopnotsupp", "windows-fat-invalid-function"],
)
def test_saves_and_the_restore_of_an_interrupted_one_copy_where_there_are_no_hard_links(
    tmp_path, monkeypatch, code, winerror
):
    """FAT and exFAT (a USB stick, an SD card) have no hard links. On Windows ``os.link`` fails there with
    ERROR_INVALID_FUNCTION, which Python gives the errno EINVAL: every save over an adapter (its backups are hard
    links) and the restore of an interrupted one failed with '<folder>: cannot save (Incorrect function)'. The
    backups are copied instead, as for the POSIX refusals."""
    import warnings

    from test_file_concurrency import state

    out = tmp_path / "a"
    state(1.0, 0).save_pretrained(out)
    os.link(out / "lordba_model.safetensors", out / ".lordba_model.safetensors.lordba-prev")  # killed between renames
    os.link(out / "adapter_config.json", out / ".adapter_config.json.lordba-prev")
    state(2.0, 1).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "lordba_model.safetensors", out / "lordba_model.safetensors")
    calls = []

    def link(src, dst, **kwargs):
        calls.append(dst)
        raise _link_refused(code, winerror)

    monkeypatch.setattr(os, "link", link)
    state(3.0, 2).save_pretrained(out)  # restores the backups (copied back), then backs them up (copied) and saves
    assert len(calls) == 4  # two restored, two backed up: each copied instead
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "lordba_model.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no interrupted save left
        assert read_adapter(out).config.alpha == 3.0
