"""Names in an adapter directory that are not its own regular files: a FIFO, a device, a link to
``/proc/self/pagemap`` or to any file of the machine. Each is refused at once, no digest of what a
link points to is ever shown, and the time to refuse a file is bounded by its header, not its size."""

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lordba import AdapterFormatError, LoRDBAConfig, get_lordba_model
from lordba.format import pair as pair_module
from lordba.format.adapter import read_adapter
from lordba.format.header import read_file_bytes

from conftest import tiny_llama

WEIGHTS, CONFIG = "lordba_model.safetensors", "adapter_config.json"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(6)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    directory = tmp_path / "adapter"
    lm.adapter_state("default").save_pretrained(directory)
    return directory


def load_in_subprocess(directory, timeout=30):
    """read_adapter in a child with a timeout, so that a hang fails the test; returns its output."""
    code = textwrap.dedent(
        f"""
        from lordba import LoRDBAError
        from lordba.format.adapter import read_adapter
        try:
            read_adapter({str(directory)!r})
            print("LOADED")
        except LoRDBAError as err:
            print("REFUSED", err)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux /proc only")
def test_a_link_to_proc_pagemap_is_refused_at_once(saved):
    (saved / WEIGHTS).unlink()
    (saved / WEIGHTS).symlink_to("/proc/self/pagemap")
    out = load_in_subprocess(saved)
    assert out.startswith("REFUSED") and "outside the adapter directory" in out


def test_a_fifo_is_refused_at_once(saved):
    (saved / WEIGHTS).unlink()
    os.mkfifo(saved / WEIGHTS)
    out = load_in_subprocess(saved)
    assert out.startswith("REFUSED") and "not a regular file" in out


def test_a_link_to_another_file_is_refused_and_its_digest_never_shown(saved, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private key material" * 100)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (saved / WEIGHTS).unlink()
    (saved / WEIGHTS).symlink_to(secret)
    with pytest.raises(AdapterFormatError, match="outside the adapter directory") as err:
        read_adapter(saved)
    assert digest not in str(err.value) and digest[:16] not in str(err.value)


def test_a_config_linking_outside_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((saved / CONFIG).read_bytes())
    (saved / CONFIG).unlink()
    (saved / CONFIG).symlink_to(outside)
    with pytest.raises(AdapterFormatError, match=f"{CONFIG}: a symbolic link to a file outside"):
        read_adapter(saved)


def test_a_checksum_mismatch_never_shows_the_files_digest(saved):
    path = saved / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match="checksum mismatch") as err:
        read_adapter(saved)
    assert hashlib.sha256(bytes(data)).hexdigest()[:16] not in str(err.value)


def test_links_inside_the_directory_and_into_a_hub_cache_blob_load(saved, tmp_path):
    (saved / WEIGHTS).rename(saved / "real.safetensors")
    (saved / WEIGHTS).symlink_to("real.safetensors")
    assert len(read_adapter(saved).modules) == 2
    repo = tmp_path / "models--user--adapter"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in (CONFIG, WEIGHTS):
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes((saved / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    assert len(read_adapter(snapshot).modules) == 2


def test_a_huge_file_whose_header_does_not_describe_it_is_refused_without_hashing(saved, monkeypatch):
    """A 1 TiB sparse tail: refused from the header alone (the file is never hashed)."""
    with open(saved / WEIGHTS, "r+b") as f:
        f.truncate(1 << 40)

    def never(*args, **kwargs):
        raise AssertionError("the file was read in full")

    monkeypatch.setattr(pair_module, "read_file_bytes", never)
    with pytest.raises(AdapterFormatError, match=r"header describes \d+ .*refused before hashing"):
        read_adapter(saved)


def test_an_unreadable_file_is_a_format_error(saved, monkeypatch):
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(WEIGHTS):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(AdapterFormatError, match="cannot open \\(Permission denied\\)"):
        read_adapter(saved)


def test_a_file_too_large_to_allocate_is_a_format_error(tmp_path):
    with open(tmp_path / "f", "wb+") as f, pytest.raises(AdapterFormatError, match="cannot allocate"):
        read_file_bytes(f, tmp_path / "f", 1 << 62)
