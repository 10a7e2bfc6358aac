"""Cache location and verified package downloads (pip only talks to the configured registries)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba._util.hashing import file_sha256
from lordba.errors import LoRDBAError


def pip_download(requirement: str, sha256: str | None, binary: bool = True) -> Path:
    """Download one distribution file (no dependencies) and check its sha256; returns its path."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            *kind,
            requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise LoRDBAError(f"could not download {requirement} with pip: {proc.stderr.strip()[-500:]}")
        got = file_sha256(files[0])
        if sha256 is not None and got != sha256:
            raise LoRDBAError(f"{requirement}: sha256 {got} differs from the expected {sha256}; refusing it")
        final = dest / files[0].name
        os.replace(files[0], final)
    return final
